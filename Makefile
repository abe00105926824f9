# ctune: `make demo` runs the main job, `make test` runs the tests. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ctune-installed
PIP_VERSION := 26.3
DEMO_WORKSPACE ?= demo-workspace
DAYS ?= 5
PYTEST_ARGS ?=

.PHONY: install demo airflow test lint clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ctune demo --workspace $(DEMO_WORKSPACE) --days $(DAYS)

# the Airflow UI on the demo workspace (after `make demo`): its DAGs, the demo's runs, ctune's page
airflow: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ctune airflow standalone --workspace $(DEMO_WORKSPACE)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_WORKSPACE) test-output .pytest_cache .ruff_cache *.egg-info
