# Two commands: `make run` (set-up + main job) and `make test` (set-up + whole suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m ironwal_mp ingest --root ./wal_data --checkpoint-every 250000
	$(PY) -m ironwal_mp verify ./wal_data

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_sharded.py

clean:
	rm -rf $(VENV) wal_data .pytest_cache .hypothesis
