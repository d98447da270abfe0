# The README's two commands: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup demo lint test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/db3kd demo

lint: setup
	$(VENV)/bin/lint-imports --no-cache

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/oracle.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
