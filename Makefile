# The README's commands. Each target sets up .venv itself (created if missing,
# reinstalled only when a requirements file or pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mera-installed

.PHONY: demo test bench install clean-venv

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

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_bench.py
	$(BIN)/python benchmarks/workers_bench.py

clean-venv:
	rm -rf $(VENV)
