# A real local Kubernetes control plane (see docs/control-plane.md). Included from the Makefile.
CLUSTER_GPUS ?= 2
.PHONY: control-plane kueue cluster-up cluster-down cluster-status

control-plane: ## Build (or reuse from ~/.cache/kubetune) etcd + kube-apiserver/controller-manager/scheduler
	hack/build-control-plane

kueue: ## Build (or reuse from ~/.cache/kubetune) the pinned Kueue controller manager, with its CRDs and webhooks
	hack/build-kueue

cluster-up: venv control-plane ## Start the control plane and node agent in the background; prints KUBECONFIG
	$(PY) -m kubetune_dev.cluster up --gpus $(CLUSTER_GPUS)

cluster-down: ## Stop the local cluster
	$(PY) -m kubetune_dev.cluster down

cluster-status: ## Is the local cluster running?
	$(PY) -m kubetune_dev.cluster status
