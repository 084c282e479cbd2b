# Two commands on a fresh machine: `make demo` (offline XPO demo) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test bench wheel vendor patches compat clean

$(STAMP): pyproject.toml setup.py
	@echo "== first use: creating $(VENV) and installing mlx-xpo-plugin with its test and plot extras"
	@echo "   (mlx, mlx-lm, mlx-lm-lora, transformers, matplotlib, ...: about 1-3 minutes, longer on a slow network)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $(STAMP)
	@echo "== installed; the commands are in $(VENV)/bin (source $(VENV)/bin/activate to put them on PATH)"

demo: $(STAMP)
	@echo "== offline XPO demo: a tiny random model learns a rule judge's preference (5-15 s; the first run also builds the model)"
	$(VENV)/bin/mlx-xpo demo

test: $(STAMP)
	@echo "== ruff (lint and format check, a few seconds), then pytest: about 790 tests, 10-15 minutes on 2 cores"
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run_all.py

# A wheel of this project in dist/ (its dependencies come from PyPI when the wheel is installed).
wheel:
	@echo "== building dist/mlx_xpo_plugin-*.whl (a few seconds; setuptools is fetched into an isolated build environment)"
	$(PYTHON) -m pip wheel --no-deps --wheel-dir dist .
	@ls dist/*.whl

vendor:
	bash vendor/sync.sh

# the patch series in patches/, regenerated from the commits of the vendored tree (vendor/src)
patches:
	bash vendor/make-patches.sh

# each supported mlx-lm-lora release, and the lowest versions pyproject.toml declares, in its own venv:
# 2 steps of xpo and online_dpo; upstream's own suite with and without patches/ (downloads)
compat: $(STAMP)
	@echo "== compat: 5 mlx-lm-lora releases and the lowest declared versions, each in its own venv, then upstream's suite (downloads from PyPI; about 10-15 minutes)"
	$(PY) -m pytest -q -m compat tests/test_compat.py

clean:
	rm -rf $(VENV) .cache runs vendor/src dist build
