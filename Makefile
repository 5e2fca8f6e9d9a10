# `make run` and `make test` work on a fresh machine with only Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run & make test` on a fresh clone: both want to create the venv. The install runs
# under an exclusive lock (fcntl: released by the kernel even if make is killed), and the
# second make, once it gets the lock, finds the stamp up to date and installs nothing.
LOCK := $(VENV).lock
LOCKED = $(PYTHON) -c 'import fcntl, subprocess, sys; lock = open(sys.argv[1], "w"); \
	fcntl.flock(lock, fcntl.LOCK_EX); sys.exit(subprocess.call(sys.argv[2:]))' $(LOCK)

.PHONY: install locked-install run test lint format bench clean

install:
	@$(LOCKED) $(MAKE) --no-print-directory locked-install

locked-install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Start the broker on SQLite with dev defaults (migrates first).
run: install
	$(BIN)/comfy-broker db upgrade
	$(BIN)/comfy-broker serve

## The whole test suite (SQLite unless BROKER_TEST_DATABASE_URL is set).
test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## The benchmark (a script, not a test): `make bench BENCH_ARGS=--quick`; wants `wrk` (apt).
bench: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(LOCK) .mypy_cache .ruff_cache .pytest_cache *.egg-info
