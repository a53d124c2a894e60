# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch (CPU wheel; override TORCH_SPEC for a GPU build)
# and then the package with its extras.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo lint test test-unit test-slow fuzz bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[ml,dp,tf,tracking,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/enclavefl demo

# The gates CI enforces before any test: ruff (lint) and mypy (types), configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy

# The suite runs on PYTEST_WORKERS pytest-xdist processes (jobs wait on each other and on the
# network, so two workers keep two cores busy), a test module at a time per worker
# (--dist loadfile): the examples, which listen on their fixed ports, run one after another.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: lint
	$(PYTEST)

# Quick feedback while editing: no end-to-end (integration) and no slow tests.
test-unit: $(STAMP)
	$(PYTEST) -m "not integration and not slow"

# One at a time: slow tests of different modules run the same fixed-port examples.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The property-based fuzz tests with a larger budget: each test's default number of examples
# times ENCLAVEFL_FUZZ_SCALE (make fuzz ENCLAVEFL_FUZZ_SCALE=200 for a long run).
ENCLAVEFL_FUZZ_SCALE ?= 40
fuzz: $(STAMP)
	ENCLAVEFL_FUZZ_SCALE=$(ENCLAVEFL_FUZZ_SCALE) $(BIN)/python -m pytest -q tests/test_fuzz_*.py --hypothesis-show-statistics

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src --pyi_out=src --grpc_python_out=src src/enclavefl/net/enclavefl.proto

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
