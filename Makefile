# The two entry points: `make demo` runs the main job, `make test` runs the tests.
# Each creates the virtual environment and installs the project first.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test doctor bench clean pair-netns pair-container

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/postcopy demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# Two hosts on one machine (README): network namespaces, then containers. Root; this venv.
pair-netns: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deploy/netns/run-pair

pair-container: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deploy/container/run-pair

doctor: $(STAMP)
	$(VENV)/bin/postcopy doctor

bench: $(STAMP)
	$(VENV)/bin/postcopy bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
