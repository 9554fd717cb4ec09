# Two entry points (see README): `make demo` and `make test`.
# Both create .venv with the project and its test tools installed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test lint venv bytecode clean

venv: $(VENV)/.installed

# Every role is a new interpreter, and its imports are on the critical path of `zcrx up`.
# Compile the packages' bytecode once (compileall skips what is up to date), so a start
# does not compile them again when PYTHONDONTWRITEBYTECODE keeps Python from caching it:
# the kernel's imports take 0.28 s instead of 0.47.
bytecode: venv
	$(BIN)/python -m compileall -q nic_proc driver_proc app_proc shared launch

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "zcrx-emu needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: bytecode
	$(BIN)/zcrx demo

test: bytecode
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find nic_proc driver_proc app_proc shared launch tests -name __pycache__ -prune -exec rm -rf {} +
