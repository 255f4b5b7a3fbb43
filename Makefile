# Two commands for a new user: `make run` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: run test api-check lint format install clean bench bench-quick compose-secrets compose-check

# Options for make run, make test, make api-check and make bench(-quick), passed on as they
# are: make run ARGS="--port-offset 100", make test ARGS="-k openapi",
# make bench ARGS="--scenarios 1,2 --peer http://127.0.0.1:8080".
ARGS ?=

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing faas-gateway, its dependencies and the development tools into $(VENV) (a minute or two the first time)"
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	touch $@

install: $(INSTALLED)

run: $(INSTALLED)
	$(PY) deploy/local_stack.py $(ARGS)

test: $(INSTALLED)
	$(PY) -m pytest $(ARGS)

# gateway/openapi.json against a stack of its own on free ports, with a throwaway data
# directory: nothing is left behind, and a running `make run` is not touched.
api-check: $(INSTALLED)
	$(PY) deploy/api_check.py $(ARGS)

bench: $(INSTALLED)
	$(PY) -m bench $(ARGS)

bench-quick: $(INSTALLED)
	$(PY) -m bench --quick $(ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache

# Basic auth credentials for deploy/docker-compose.yml's gateways, NATS passwords for its
# gateways and workers and for its cluster's routes (all kept if they exist), and the
# nats-server configs with their users: in deploy/secrets, which only its owner may enter.
compose-secrets: $(INSTALLED)
	@$(PY) deploy/compose_secrets.py deploy/secrets

# deploy/docker-compose.yml for real, on the local Docker engine: `docker compose config` for
# every profile, then the stack and the cluster profile's stack, each built, called, stopped
# with a call in flight and removed (down -v). Options in ARGS: make compose-check ARGS="--help".
compose-check: compose-secrets
	$(PY) deploy/compose_check.py $(ARGS)
