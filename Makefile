# Quick start: `make demo` (train CrossFusion on the built-in synthetic cohort, print the leaderboard) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.milbench-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast benchmark leaderboards clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# the tests run a small grid on a local Ray instance: they need the ray extra
RAY_STAMP := $(VENV)/.milbench-ray-installed
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,ray]"
	touch $(RAY_STAMP)

# CrossFusion at a laptop width (embed 64, 2 heads; the paper's 512 takes ~0.3 s a step on one CPU core) for 6
# epochs of the small recipe: about 2.5 minutes on 2 cores.
DEMO_RUN := --model crossfusion --cohort synthetic --set embed_dim=64 --set n_heads=2 --epochs 6 --runs-dir runs/demo

demo: setup
	$(VENV)/bin/milbench run $(DEMO_RUN)
	$(VENV)/bin/milbench leaderboard --runs-dir runs/demo

test: setup $(RAY_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The synthetic benchmark (benchmarks/synthetic.toml: 13 models x 4 scenarios x 3 seeds x 5 folds) into
# leaderboards/synthetic/runs; resumable. About 13 CPU-hours at one core per fold: JOBS folds at once, or
# BENCH_ARGS="--executor ray" (see the README's cluster section) to spread it.
JOBS ?= 2
BENCH_ARGS ?=

benchmark: setup
	$(VENV)/bin/milbench benchmark benchmarks/synthetic.toml --device cpu --max-parallel $(JOBS) $(BENCH_ARGS)

# Every committed run store leaderboards/<name>/runs/ is rendered into leaderboards/<name>/ (md, tex, html, csv),
# and the published figures into leaderboards/reported/ (see leaderboards/README.md).
LEADERBOARD_STORES := $(wildcard leaderboards/*/runs)

leaderboards: setup
	$(VENV)/bin/milbench leaderboard --reported-only --out leaderboards/reported
	@for runs in $(LEADERBOARD_STORES); do \
		echo "milbench leaderboard --runs-dir $$runs --out $$(dirname $$runs)"; \
		$(VENV)/bin/milbench leaderboard --runs-dir $$runs --out $$(dirname $$runs) || exit 1; \
	done

clean:
	rm -rf runs/demo .pytest_cache
