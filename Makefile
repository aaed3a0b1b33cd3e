# hyperlaw — one command to run, one to test. Everything installs into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run lint browser test bench clean

install: $(STAMP)

# torch is pinned to the CPU wheel first so that nothing later pulls a CUDA build;
# DeepSpeed ships only an sdist whose setup.py imports torch, so it builds against
# the torch already in the venv (no build isolation).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip<26.2" setuptools wheel
	$(PY) -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation "deepspeed>=0.15,<0.20"
	$(PY) -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/hyperlaw quickstart

# Style, types and the import contract (layers in pyproject.toml) before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The dashboard's browser test drives Debian's chromium (never a downloaded browser); it is
# installed here when missing, and the test says why it skipped where that was not possible.
CHROMIUM ?= /usr/bin/chromium
browser:
	@[ -x $(CHROMIUM) ] || { apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || \
	  echo "could not install Debian's chromium: the dashboard's browser test will skip"; }

# -X faulthandler: a crash in native code, even at exit, prints every thread's Python stack
test: lint browser
	$(PY) -X faulthandler -m pytest -q

bench: install
	$(PY) benchmarks/recommend_quality.py
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/query.py
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
