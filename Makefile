# Kubetune. A newcomer needs two targets: `make demo` and `make test` (see README.md).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help venv test test-unit lint fmt clean system-deps

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## Create .venv and install the project with every extra, the trainer image's versions
$(VENV)/.installed: pyproject.toml trainer-image/constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) -c trainer-image/constraints.txt -e '.[dev]'
	@touch $@

test-unit: venv ## Fast tests: no control plane needed
	$(PYTEST) -m "not cluster"

lint: venv ## ruff
	$(VENV)/bin/ruff check .

fmt: venv
	$(VENV)/bin/ruff check --fix .

clean: ## Remove local work files (not the venv, not the control-plane cache)
	rm -rf .work .demo .pytest_cache

system-deps: ## Debian packages the tests need (prometheus, etcd fallback); needs root
	@if [ -x hack/install-system-deps ]; then hack/install-system-deps; fi

-include mk/*.mk

test: venv system-deps control-plane kueue ## Everything: lint, unit, trainer, control-plane and end-to-end tests
	$(VENV)/bin/ruff check .
	$(PYTEST)
