# fedjax_dp: two commands on a fresh machine.
#   make demo  -> .venv, install, DP-FedAvg on the bundled digits
#   make test  -> .venv, install .[dev], the test suite (slow benchmarks excluded)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-multidevice test-slow lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@ $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedjax-dp run experiments/digits_dp_fedavg.toml

# loadgroup: the tests of one xdist_group (a module whose tests share compiled rounds) run
# on one worker; the rest are handed out one by one.
test: $(DEV_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests --ignore=tests/multidevice
	$(MAKE) --no-print-directory test-multidevice

# Own process: the flag must be set before JAX initialises.
test-multidevice: $(DEV_STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q tests/multidevice

# The benchmark smoke runs marked slow (minutes each), left out of `make test`.
test-slow: $(DEV_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m slow tests --ignore=tests/multidevice

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check fedjax_dp tests benchmarks experiments

clean:
	rm -rf $(VENV) runs .pytest_cache
