# The operator: CRD generation and its end-to-end tests (included by the top-level Makefile).
.PHONY: crds e2e operator-test run-operator dev-cluster dev-cluster-down

crds: venv ## Regenerate crds/ (and the chart's copy) from the typed API (api/kubetune_api)
	$(PY) -m kubetune_api.crd > crds/kubetune.io_finetunejobs.yaml.tmp
	mv crds/kubetune.io_finetunejobs.yaml.tmp crds/kubetune.io_finetunejobs.yaml
	$(PY) -m kubetune_api.crd finetunesweeps > crds/kubetune.io_finetunesweeps.yaml.tmp
	mv crds/kubetune.io_finetunesweeps.yaml.tmp crds/kubetune.io_finetunesweeps.yaml
	$(PY) -m kubetune_operator.policy  # crds/policy/ and the chart's files/admission-policy.yaml
	$(MAKE) --no-print-directory chart-crds

operator-test: venv ## The operator's unit tests (no cluster)
	$(PY) -m pytest -q tests/operator_tests -m "not cluster"

e2e: venv system-deps control-plane kueue ## The operator against the local control plane and node agent
	$(PY) -m pytest -q tests/operator_tests -m e2e --durations=10

run-operator: venv ## Run the operator against $$KUBECONFIG, every namespace
	$(PY) -m kubetune_operator --all-namespaces

KUEUE ?=
dev-cluster: venv control-plane $(if $(KUEUE),kueue) ## Cluster + node agent + seeded S3 server + operator (KUEUE=1: + Kueue), in the background
	$(PY) -m kubetune_dev.cluster up --dev --gpus $(CLUSTER_GPUS) $(if $(KUEUE),--kueue)

dev-cluster-down: ## Stop the dev cluster (everything `make dev-cluster` started)
	$(PY) -m kubetune_dev.cluster down
