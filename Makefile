# FaceScale developer entry points. `make demo` and `make test` install first (a no-op when nothing changed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# torch goes in first, alone, pinned from requirements.txt: a CPU wheel here, and it stops pip from pulling a
# newer CUDA build when other packages ask for "torch".
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)
DEMO_DATA := data/synth
# The demo pins the CPU kernels to AVX2 (oneDNN convolutions, ATen's vectorised ops, MKL), so x86 machines with and
# without AVX-512 run the same arithmetic and print the same numbers (runs record it: facescale.cpu_capability).
DEMO_KERNELS := DNNL_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip==25.3"
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	@test -f $(DEMO_DATA)/manifest.json || $(VENV)/bin/facescale data synth --config configs/demo.yaml
	$(DEMO_KERNELS) $(VENV)/bin/facescale distill --pipeline pipelines/demo.yaml

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check platform jobs tests benchmarks

bench: setup
	$(PY) benchmarks/backbones.py

clean:
	rm -rf $(VENV) data/synth mlruns.db mlartifacts runs
