# Quick start: `make demo` (install + run the main job on the embedded default case)
#              `make test` (install + run the whole test suite)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS := ml,qp,report,dev

.PHONY: install demo test lint bench clean sysdeps wheel-check

# Versions: the ranges of pyproject.toml, pinned exactly by constraints.txt (torch==2.13.0 is
# the CPU wheel on this machine's disk; no CUDA build is ever downloaded).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		-e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/atp demo --out results/demo

# dciodvfy (Debian package dicom3tools) checks the exported DICOM files in the tests; it is
# installed when missing and we are root with apt-get, otherwise those tests skip and say why.
sysdeps:
	@command -v dciodvfy >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools >/dev/null); } || echo "sysdeps: dciodvfy not installed (needs root and apt-get); DICOM validation tests will skip"

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q

# build the wheel, install it into fresh venvs (bare, then [ml,report]) and run `atp demo`
wheel-check: $(STAMP)
	bash .ci/wheel_check.sh $(PYTHON)

lint: $(STAMP)
	$(BIN)/ruff check atp predictor optimizer sequencer tests benchmarks training

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-enable

clean:
	rm -rf $(VENV) results .pytest_cache
