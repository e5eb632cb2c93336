# Helm chart, Grafana dashboard, alerts and container images (included by the top-level Makefile).
HELM ?= $(VENV)/bin/helm
HADOLINT ?= $(VENV)/bin/hadolint
PROMTOOL ?= promtool
CHART := charts/kubetune
ALERTS_DIR := .work/alerts

.PHONY: chart-crds dashboard alerts lint-chart lint-images chart-e2e

# The chart's crds/ = the generated crds/.
chart-crds: ## Copy the generated CRDs (crds/) into the chart (charts/kubetune/crds/)
	find $(CHART)/crds -name '*.yaml' -delete
	cp crds/*.yaml $(CHART)/crds/

dashboard: venv ## Regenerate the Grafana dashboard JSON from operator/kubetune_dashboard
	$(PY) -m kubetune_dashboard > $(CHART)/dashboards/kubetune.json.tmp
	mv $(CHART)/dashboards/kubetune.json.tmp $(CHART)/dashboards/kubetune.json

alerts: venv ## Render the chart's alerts as a plain rules file and check them with promtool (check + unit tests)
	@mkdir -p $(ALERTS_DIR)
	$(PY) -m kubetune_dashboard.alerts > $(ALERTS_DIR)/kubetune.rules.yaml
	cp tests/chart/alerts_test.yaml $(ALERTS_DIR)/
	$(PROMTOOL) check rules $(ALERTS_DIR)/kubetune.rules.yaml
	cd $(ALERTS_DIR) && $(PROMTOOL) test rules alerts_test.yaml

lint-chart: venv ## helm lint the chart (default, every optional part on, and without the admission policy)
	$(HELM) lint --strict $(CHART)
	$(HELM) lint --strict $(CHART) --set replicas=2 --set leaderElection.leaseName=ops \
	  --set 'watchNamespaces={team-a,team-b}' --set serviceMonitor.enabled=true \
	  --set podMonitor.enabled=true --set prometheusRule.enabled=true \
	  --set 'policy.allowedImagePrefixes={registry.example.com/ml/}' --set 'policy.defaultCredentialsNamespaces={team-a}'
	$(HELM) lint --strict $(CHART) --set policy.admission.enabled=false --set rbac.create=false

lint-images: venv ## hadolint both Dockerfiles
	$(HADOLINT) Dockerfile trainer-image/Dockerfile

chart-e2e: venv control-plane ## helm install into the local cluster, train a job, check RBAC, Prometheus and every dashboard panel
	$(PYTEST) tests/chart/test_install.py
