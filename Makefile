# The README's commands. Each target sets up .venv itself (created if missing,
# reinstalled only when a requirements file or pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mera-installed

.PHONY: demo test test-fast lint bench docs install clean-venv

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

# The toy demo: build the zoo (cached), then experts, fine-tuning and MERA (10%)
# through image -> video -> audio -> point; prints the table, writes runs/demo/.
demo: $(STAMP)
	$(BIN)/mera toy build
	$(BIN)/mera run configs/toy/demo.yaml --out runs/demo --resume --workers 2

# ruff, the layer contract (lint-imports, pyproject.toml) and the whole suite; -rs prints why a test
# skipped (without Chromium: the report.html browser test, one line saying how to install it)
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15 -rs

# the inner loop: lint and the tests that do not train a run (about 90 s)
test-fast: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_bench.py
	$(BIN)/python benchmarks/workers_bench.py
	$(BIN)/python benchmarks/loop_parity.py
	$(BIN)/python benchmarks/sharing_bench.py
	$(BIN)/python benchmarks/judge_cache_bench.py
	$(BIN)/python benchmarks/merge_precision.py
	$(BIN)/python benchmarks/peak_memory_bench.py

# the documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or page fails it
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean-venv:
	rm -rf $(VENV)
