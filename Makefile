# The two commands: `make quickstart` and `make test`. Both create .venv when it is missing or
# older than requirements.txt / pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PIPELINE ?= bert_wn_lexname
RUNS ?= runs

REPRO_STAMP := $(VENV)/.installed-reproduce
REPRO_SIZE ?= cpu
REPRO_ARGS ?=

.PHONY: quickstart test reproduce bench lint format clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# Pre-train a tiny BERT, fine-tune it on wn_lexname, fine-tune the same from scratch, compare.
# Other pipelines: make quickstart PIPELINE=t5_kjv2web (or gpt_code_summary).
quickstart: $(STAMP)
	rm -rf $(RUNS)/quickstart_$(PIPELINE)
	$(BIN)/python -m kiln.main --config experiments/pipelines/$(PIPELINE).py:size=tiny \
		--workdir $(RUNS)/quickstart_$(PIPELINE)

# The tests also need requirements-test.txt (transformers, torch CPU: reference
# implementations for the Hugging Face interop tests), installed here only, not by quickstart.
$(TEST_STAMP): $(REPRO_STAMP) requirements-test.txt
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $(TEST_STAMP)

# The non-neural baselines of `make reproduce` need scikit-learn (TF-IDF + linear SVM).
$(REPRO_STAMP): $(STAMP) requirements-reproduce.txt
	$(BIN)/pip install --quiet -r requirements-reproduce.txt
	touch $(REPRO_STAMP)

# The claim for every family: pre-trained vs scratch at 1k / 5k / all labels x 3 seeds, beside
# the non-neural baselines; writes docs/reproduction.{json,md} and plots. Hours on a 2-core CPU;
# re-running skips finished cells. E.g. make reproduce REPRO_SIZE=tiny REPRO_ARGS="--seeds 0".
reproduce: $(REPRO_STAMP)
	$(BIN)/python -m kiln.tools.reproduce --size $(REPRO_SIZE) --workdir $(RUNS)/reproduce \
		$(REPRO_ARGS)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n 2 tests

# kiln against transformers (Flax, PyTorch) and MaxText, same shapes, interleaved; prints the
# table and appends it to benchmarks/RESULTS.md. First run creates the peers' virtualenvs
# under benchmarks/.cache/ (a few GB, several minutes).
bench: $(STAMP)
	$(BIN)/python benchmarks/peers.py

lint: $(STAMP)
	$(BIN)/ruff check src tests experiments benchmarks
	$(BIN)/ruff format --check src tests experiments benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests experiments benchmarks
	$(BIN)/ruff check --fix src tests experiments benchmarks

clean:
	rm -rf $(VENV) $(RUNS)
