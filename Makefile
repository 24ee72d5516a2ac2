# Quick start: `make demo` (install + run the main job on the embedded default case)
#              `make test` (install + run the whole test suite)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS := ml,qp,report,dev

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/atp demo --out results/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check atp predictor optimizer sequencer tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-enable

clean:
	rm -rf $(VENV) results .pytest_cache
