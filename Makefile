# `make run`: set up .venv (once) and run the default pipeline; `make test`: the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	PATH="$(BIN):$$PATH" snakemake --cores all --configfile config/config.yaml

test: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pytest -q

clean:
	rm -rf results logs checkpoints benchmarks/*/ .snakemake mlflow.db mlartifacts
