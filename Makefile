# Two commands on a fresh machine: `make demo` (offline XPO demo) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test bench vendor patches compat clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mlx-xpo demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run_all.py

vendor:
	bash vendor/sync.sh

# the patch series in patches/, regenerated from the commits of the vendored tree (vendor/src)
patches:
	bash vendor/make-patches.sh

# each supported mlx-lm-lora release in its own venv: 2 steps of xpo and online_dpo (downloads)
compat: $(STAMP)
	$(PY) -m pytest -q -m compat tests/test_compat.py

clean:
	rm -rf $(VENV) .cache runs vendor/src
