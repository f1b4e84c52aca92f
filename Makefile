# Two commands set up and run everything on a fresh machine:
#   make demo   install, run the embedded default grid, write results/leaderboard.{md,csv,html}
#   make test   install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test leaderboard clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: the CPU wheel of 2.13.0 (a looser spec pulls a multi-GB CUDA build)
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[offline,test]'
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/python -m bench +experiment=demo -m
	$(BIN)/python -m analysis leaderboard

leaderboard: install
	$(BIN)/python -m analysis leaderboard

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf results/runs results/hydra
