# The two commands: `make run` starts the gateway on etc/clawdbot.yaml,
# `make test` runs every test.  Both set up what they need on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps
TEST_DEPS := $(VENV)/.test-deps
INSTALLED := $(VENV)/.installed
SOURCES := $(wildcard clawdbot/*.py clawdbot/*/*.py) twisted/plugins/clawdbot_plugin.py setup.cfg pyproject.toml

.PHONY: run test bench clean

run: $(INSTALLED)
	$(VENV)/bin/clawdbot start --config etc/clawdbot.yaml

test: $(INSTALLED) $(TEST_DEPS) test-deps
	$(PY) -m pytest -q

bench: $(INSTALLED)
	@command -v wrk >/dev/null 2>&1 || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk; } || echo "wrk not installed: bench/loadgen.py measures instead"
	$(PY) bench/run.py

# Python packages, pinned in setup.cfg: what running needs, and (for make
# test only) the test tools and client libraries.
$(DEPS): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q .
	touch $@

$(TEST_DEPS): $(DEPS)
	$(PY) -m pip install -q '.[test]'
	touch $@

# The package itself, reinstalled when its sources change (a regular
# install, so the twistd plugin lands in twisted/plugins).
$(INSTALLED): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-deps --force-reinstall .
	rm -rf build
	touch $@

.PHONY: test-deps
test-deps:
	@sh tests/setup-deps.sh

clean:
	rm -rf $(VENV) build *.egg-info var _trial_temp
