# `make run`: set up .venv (once) and run the default pipeline; `make test`: the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv clean

venv: $(STAMP)

# pip's own lines (Collecting / Downloading with a progress bar / Installing) show what is being installed.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "sslpipe set-up: creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@echo "sslpipe set-up: upgrading pip in $(VENV)"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "sslpipe set-up: installing sslpipe (editable) and its dependencies from pyproject.toml"
	@echo "  (PyTorch is the large download; a few minutes the first time):"
	@$(BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print(' ', ', '.join(p['dependencies'] + p['optional-dependencies']['test']))"
	@$(BIN)/python -m pip install -e '.[test]'
	@touch $(STAMP)
	@echo "sslpipe set-up: done ($(VENV) ready; activate with: source $(VENV)/bin/activate)"

run: $(STAMP)
	PATH="$(BIN):$$PATH" snakemake --cores all --configfile config/config.yaml

test: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pytest -q

clean:
	rm -rf results logs checkpoints benchmarks/*/ .snakemake mlflow.db mlflow.db.lock mlartifacts
