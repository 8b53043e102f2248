# The two commands a new user needs: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?=
# Options for benchmarks/run.py, e.g. make bench BENCH_ARGS='--repeat 3 --messages 3000'.
BENCH_ARGS ?=

.PHONY: run test lint check-clean bench clean

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) \
	  || (rm -rf $(VENV) && sh scripts/ensure-venv-support.sh $(PYTHON) && $(PYTHON) -m venv $(VENV))
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# The twistd dropin is found through sys.path (Twisted scans twisted/plugins/ on it).
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
	  | xargs -I{} sh -c 'echo "$(CURDIR)" > {}/twistedrelay-dropin.pth'
	touch $@

run: $(BIN)/.installed
	$(BIN)/twistd -n twistedrelay $(if $(CONFIG),--config $(CONFIG))

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

test: $(BIN)/.installed lint
	sh scripts/install-test-tools.sh
	$(BIN)/pytest

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info var
