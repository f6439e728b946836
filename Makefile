# Quick start: `make demo` and `make test`. Both create .venv on first use and install into it.
# torch is pinned (constraints.txt) to the local CPU wheel: any other specifier pulls gigabytes of CUDA.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The showcase on the built-in model: length perception, then the schedulers side by side.
demo: $(STAMP)
	$(BIN)/lengthwise demo --out-dir demo-out

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
