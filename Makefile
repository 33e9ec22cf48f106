# Everyday commands. Tools come from .venv/bin/ where the virtualenv exists, else from PATH.
BIN := $(if $(wildcard .venv/bin/python),.venv/bin/,)
PYTEST := $(BIN)pytest
RUFF := $(BIN)ruff
MYPY := $(BIN)mypy
CODE := ddist tests scripts

.PHONY: test-fast test lint typecheck format ci

test-fast:  ## the fast tier: everything not marked slow
	$(PYTEST) -m "not slow"

test:  ## every test
	$(PYTEST)

lint:  ## what CI refuses: lint errors and unformatted files
	$(RUFF) check $(CODE) && $(RUFF) format --check $(CODE)

typecheck:
	$(MYPY)

format:  ## fix what ruff can and format the code
	$(RUFF) check --fix $(CODE) && $(RUFF) format $(CODE)

ci:  ## what CI runs
	.ci/run
