# Two commands: `make run` (set-up + main job) and `make test` (set-up + whole suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-pythons bench clean

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

# The suite under each python3.N (3.10 up) that runs here, each in its own .venv-3.N: for
# checking the versions pyproject.toml admits; not part of CI, which runs `make test`. Or name
# the interpreters: make test-pythons PYTHONS="/usr/bin/python3.12 ...". (With pyenv, list the
# versions first: PYENV_VERSION=3.10.13:3.13.0 make test-pythons.)
PYTHONS ?=

test-pythons:
	@set -e; pys="$(PYTHONS)"; \
	if [ -z "$$pys" ]; then for n in 10 11 12 13 14 15; do \
	  if python3.$$n -c '' >/dev/null 2>&1; then pys="$$pys python3.$$n"; fi; done; fi; \
	[ -n "$$pys" ] || { echo "no python3.N (N >= 10) runs here"; exit 1; }; \
	for py in $$pys; do \
	  v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  echo "== $$py (Python $$v)"; \
	  [ -x .venv-$$v/bin/python ] || $$py -m venv .venv-$$v; \
	  .venv-$$v/bin/python -m pip install --quiet -e '.[test]'; \
	  .venv-$$v/bin/python -m pytest -q; \
	done

bench: $(STAMP)
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_sharded.py

clean:
	rm -rf $(VENV) .venv-3.* wal_data .pytest_cache .hypothesis
