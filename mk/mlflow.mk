# The MLflow tracking server that the tests of spec.tracking.mlflow start (kubetune_dev.mlflow_server). Included
# from the Makefile. Its venv is its own (the full `mlflow` pins what the project's venv cannot hold).
.PHONY: mlflow-server

mlflow-server: venv ## Build (or reuse from ~/.cache/kubetune) the MLflow tracking server's own venv (mlflow 3.17.2)
	$(PY) -m kubetune_dev.mlflow_server install
