# The two entry points of the README. Both set up .venv first (seconds when it is current).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint fmt
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/hw-dq demo

test: setup
	$(PY) -m ruff check hw_dq tests benchmarks notebooks scripts
	$(PY) -m ruff format --check hw_dq tests benchmarks notebooks scripts
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site  # not --quiet: it hides the warnings --strict counts
	$(PY) -m pytest -q -n auto --dist loadfile --durations=15 $(PYTEST_ARGS)  # one worker per core, each test file on one worker

fmt: setup
	$(PY) -m ruff format hw_dq tests benchmarks notebooks scripts
	$(PY) -m ruff check --fix hw_dq tests benchmarks notebooks scripts
