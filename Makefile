# The two entry points: `make demo` runs the main job, `make test` runs the tests.
# Each creates the virtual environment and installs the project first.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test doctor bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/postcopy demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

doctor: $(STAMP)
	$(VENV)/bin/postcopy doctor

bench: $(STAMP)
	$(VENV)/bin/postcopy bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
