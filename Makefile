# The two commands: `make quickstart` and `make test`. Both create .venv when it is missing or
# older than requirements.txt / pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FAMILY ?= gpt
RUNS ?= runs

.PHONY: quickstart test lint format clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

quickstart: $(STAMP)
	rm -rf $(RUNS)/quickstart_$(FAMILY)
	$(BIN)/python -m kiln.main --config experiments/$(FAMILY)/pretrain.py:size=tiny \
		--workdir $(RUNS)/quickstart_$(FAMILY)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

lint: $(STAMP)
	$(BIN)/ruff check src tests experiments benchmarks
	$(BIN)/ruff format --check src tests experiments benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests experiments benchmarks
	$(BIN)/ruff check --fix src tests experiments benchmarks

clean:
	rm -rf $(VENV) $(RUNS)
