# The two set-up commands of the README. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-faults install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m reid_ray.demo

# the suite, without the fault-injection tests (marker `faults`: they kill workers, actors, drivers, nodes and
# servers, and take about a third of the time); CI runs both
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not faults"

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults

clean:
	rm -rf $(VENV) *.egg-info
