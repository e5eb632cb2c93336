# Kubetune. A newcomer needs two targets: `make demo` and `make test` (see README.md).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Python writes the bytecode of what it imports (into .venv and __pycache__/, both ignored by git). This machine's
# shell sets PYTHONDONTWRITEBYTECODE=1, under which every test process, pod and trainer subprocess compiled what it
# imported from source again (python -m kubetune_dev.bytecode, docs/testing.md).
unexport PYTHONDONTWRITEBYTECODE

.DEFAULT_GOAL := help
.PHONY: help venv test test-setup go-builds test-unit test-fast lint fmt clean system-deps

# Tests run on TEST_WORKERS pytest-xdist workers (tests/conftest.py, docs/testing.md): the `cluster` tests in three
# shards, each on a worker with its own control plane (they mostly wait on it), the other files spread over the
# workers. Five workers keep both cores busy on a 2-core machine; TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 5
PARALLEL = $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# testing/ (kubetune-dev: local cluster, S3 server, tiny models, demo data): installed here only, never in an image.
venv: $(VENV)/.installed ## Create .venv: the project with every extra (the trainer image's versions) and testing/
$(VENV)/.installed: pyproject.toml testing/pyproject.toml trainer-image/constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) -c trainer-image/constraints.txt -e '.[dev]' -e ./testing
	@# the bytecode of what the tests import first (torch, transformers, ...), once, before five workers import it
	$(PY) -m kubetune_dev.bytecode
	@touch $@

test-unit: venv ## The unit tests: no control plane, nothing slow (under 3 minutes), in random order
	$(PYTEST) $(PARALLEL) -m "not cluster and not slow"

test-fast: venv mlflow-server ## The tests your change touches (pytest-testmon) plus the unit tests: the inner loop
	@# exit 5: testmon selected nothing (nothing changed since the last run)
	$(PYTEST) -p no:randomly --testmon --testmon-forceselect -m "not cluster" -q || test $$? -eq 5
	$(PYTEST) $(PARALLEL) -m "not cluster and not slow" -q

lint: venv ## ruff
	$(VENV)/bin/ruff check .

fmt: venv
	$(VENV)/bin/ruff check --fix .

clean: ## Remove local work files (not the venv, not the control-plane cache)
	rm -rf .work .demo .pytest_cache .testmondata

system-deps: ## Debian packages the tests need (prometheus, chromium, etcd fallback); needs root
	@if [ -x hack/install-system-deps ]; then hack/install-system-deps; fi

-include mk/*.mk

test: ## Everything: lint, unit, trainer, control-plane and end-to-end tests
	@# On a fresh machine the Go builds keep both cores busy for about 9 minutes, while the venv, the Debian packages
	@# and MLflow's venv mostly download: they run side by side (docs/testing.md, "A fresh machine"). `make -jN test`
	@# passes its own -j down instead.
	$(MAKE) --no-print-directory $(if $(filter -j%,$(MAKEFLAGS)),,-j3) test-setup
	$(VENV)/bin/ruff check .
	$(PYTEST) $(PARALLEL) --durations=25

test-setup: venv system-deps go-builds mlflow-server  # what `make test` needs, built or reused

go-builds:  # the control plane, then Kueue: one Go build at a time, each keeps both cores busy
	hack/build-control-plane
	hack/build-kueue
