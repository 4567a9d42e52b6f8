# ptychostream: `make demo` runs the device on the simulated detector; `make test` type-checks and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRAIN_STAMP := $(VENV)/.installed-train
# the training and iterative tests need PyTorch and torchvision (pty-chi imports it); pip takes
# these two from the local disk where it can (override for another build)
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench pvtable clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,screens,bluesky]'
	touch $(STAMP)

$(TRAIN_STAMP): $(STAMP)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[iterative]'
	# ptychodus' beamline file readers need only numpy, h5py, scipy and scikit-image; its own
	# requirements bring an LLM-agent stack (pydantic-ai, mlflow) the readers never import
	$(PY) -m pip install -q --no-deps 'ptychodus>=1.7,<2'
	touch $(TRAIN_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m ptychostream.cli.demo $(DEMO_ARGS)

# mypy first (files and settings in pyproject's [tool.mypy]); then the GPU script's dry run on the
# CPU (about 100 s, its few seconds of training and the scoring included; a failed step does not
# stop make: tests/test_benchmarks.py reads its output from GPU_CHECK_OUT and fails on it); pytest
# in a random order within and across modules (the seed is printed in the header:
# --random-order-seed=N repeats an order)
GPU_CHECK_OUT := build/gpu-check-dry
test: $(STAMP) $(TRAIN_STAMP)
	$(PY) -m mypy
	rm -rf $(GPU_CHECK_OUT)
	-PYTHON=$(PY) bash benchmarks/gpu_check.sh --dry-run --out $(GPU_CHECK_OUT)
	PTYCHOSTREAM_GPU_CHECK_OUT=$(abspath $(GPU_CHECK_OUT)) $(PY) -m pytest -p random_order --random-order-bucket=module $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

pvtable: $(STAMP)
	$(PY) -m ptychostream pvtable --update README.md

clean:
	rm -rf $(VENV) demo-out .pytest_cache
