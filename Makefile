# The two quick-start commands: `make demo` (the main job end to end) and `make test`.
# Both create the virtualenv .venv on first use (nothing else needs to be installed by hand).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/moleflow: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[train,edge,dev]'
	touch $@

install: $(BIN)/moleflow

demo: install
	$(BIN)/moleflow demo

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
