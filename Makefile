# The two set-up commands of the README. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test test-quick bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,test]'
	touch $(STAMP) $(DEMO_STAMP)

# the demo needs no test extras (ONNX, moto, Playwright): a shorter first install
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu]'
	touch $(DEMO_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m reid_ray.cli.demo

# the whole suite (what CI runs); PYTHONFAULTHANDLER: a crash in native code prints every thread's stack
test: $(STAMP)
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q

# while you work: the tests that start no Ray and kill nothing (markers `ray` and `faults` left out), 603 of 653,
# 3:53-4:58 on 2 cores (2026-12-07); `make test` runs them all (37:42)
test-quick: $(STAMP)
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q -m "not ray and not faults"

# every CPU benchmark, side by side with its peers, at several sizes (about 15 min on 2 cores): rewrites the
# generated section of bench/RESULTS.md and its plots. Cython builds the peer evaluator (torchreid's rank_cy).
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[cpu,bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) *.egg-info
