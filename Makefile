# Quick start: `make demo` (train CrossFusion on the built-in synthetic cohort, print the leaderboard) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.milbench-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/milbench run --model crossfusion --cohort synthetic --runs-dir runs/demo
	$(VENV)/bin/milbench leaderboard --runs-dir runs/demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs/demo .pytest_cache
