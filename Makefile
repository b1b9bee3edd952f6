# Both targets create or reuse .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch==2.13.0 is the CPU build on these machines; elsewhere pip picks the platform's build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e ".[dev,sglang]"
	touch $(STAMP)

# the check runs whenever there is an output (a failed record makes extract exit 1, and make run too)
run: $(STAMP)
	rm -f out/sample_extracted.jsonl
	$(BIN)/llmir extract --schema examples/extract_person.py:Person --input examples/sample_records.jsonl --output out/sample_extracted.jsonl; \
	status=$$?; \
	if [ -s out/sample_extracted.jsonl ]; then \
	  $(BIN)/python examples/check_extraction.py examples/sample_records.jsonl out/sample_extracted.jsonl || status=1; \
	fi; \
	exit $$status

test: $(STAMP)
	$(BIN)/pytest tests

lint: $(STAMP)
	$(BIN)/ruff check llmir_lang kernels tests benchmarks scripts examples

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV)
