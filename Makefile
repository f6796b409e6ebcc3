# The two commands of the quick start. Each creates .venv when it is absent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch unless the machine has an NVIDIA driver: never pull a multi-GB CUDA
# build onto a machine that cannot use it. Without a driver, PyTorch's CPU index is used when it
# answers within 5 s; otherwise pip's own configuration decides (a local wheel, a mirror, PyPI).
# Override with `make TORCH=... TORCH_INDEX=...`.
TORCH ?= torch==2.13.0
CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || \
	$(PYTHON) -c "import urllib.request as r; r.urlopen('$(CPU_INDEX)/', timeout=5)" >/dev/null 2>&1 && \
	echo $(CPU_INDEX))

.PHONY: demo test lint clean

# The evaluation tests cross-check our Inception against torch-fidelity's, installed with --no-deps
# (its dependencies would pull torchvision and a CUDA torch); the tests load only its module files.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || { index="$(TORCH_INDEX)"; \
		$(PY) -m pip install -q "$(TORCH)" $${index:+--index-url "$$index"}; }
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps torch-fidelity==0.4.0
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ditlab demo

# mypy's settings (and the modules it is not yet strict on) are in pyproject.toml; its cache makes a
# second run take seconds. The tests run in one worker process per core (pytest-xdist), each with one
# thread: most of the suite's time is processes starting (torchrun, the CLI), which a second core
# overlaps (on 2 cores: 260 s against 385 s in one process).
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m mypy
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# The wheels benchmarks/gpu_check.py needs on a GPU machine that has torch 2.x and Python 3.12 but
# not diffusers or pytest, into the git-ignored .whl/ (see benchmarks/README.md).
.PHONY: gpu-wheels
gpu-wheels: $(VENV)/.installed
	$(PY) benchmarks/gpu_wheels.py --dest .whl
