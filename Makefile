# Two commands do all set-up: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint typecheck unit demo bench bench-proxy clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check balancer tests loadtest

typecheck: $(STAMP)
	$(BIN)/mypy balancer

test: lint typecheck
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/python -m loadtest.demo

bench: bench-proxy

bench-proxy: $(STAMP)
	sh loadtest/install-bench-tools.sh
	$(BIN)/python -m loadtest.bench_proxy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache results
