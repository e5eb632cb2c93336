"""spec.tracking.mlflow against a real `mlflow server` (sqlite backend, on loopback; kubetune_dev.mlflow_server):
a tiny training run logs to it and MLflow's own client reads the run back; an unreachable server costs a warning."""

from __future__ import annotations

import json

import pytest
from kubetune_trainer.pipeline import run
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
pytest_plugins = ["kubetune_dev.mlflow_server"]

TOKEN = "mlflow-canary-7f3a9c1e5b2d4f60"  # the Secret's token, as the operator sets it: never printed or stored


@pytest.fixture(autouse=True)
def client_env(monkeypatch):
    """The pod's environment: the token from the Secret, and MLflow's client's HTTP settings set here rather than
    by the tracker, so that they do not outlive the test."""
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    monkeypatch.setenv("KUBETUNE_NAMESPACE", "team-a")
    for key, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}.items():
        monkeypatch.setenv(key, value)


def tracked_config(make_config, name: str, uri: str, max_steps: int):
    return make_config(name, hyperparameters={"maxSteps": max_steps, "loggingSteps": 2},
                       evaluation={"everySteps": 4}, checkpoint={"everySteps": 100},
                       tracking={"mlflow": {"uri": uri, "experiment": "support-bots"}})


def test_a_run_is_logged_to_mlflow_and_read_back(make_config, mlflow_server, capfd):
    config = tracked_config(make_config, "support-mlflow", mlflow_server.uri, max_steps=8)
    events: list[dict] = []
    manifest = run(config, report=events.append)

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("support-bots")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name.startswith("support-mlflow-")
    assert found.data.tags["kubetune.output_uri"] == config.output.uri
    assert found.data.tags["kubetune.namespace"] == "team-a"
    assert found.data.tags["kubetune.run_id"] == manifest["run"]["uid"]
    params = found.data.params
    assert params["baseModel.uri"] == config.base_model.uri and params["dataset.train"] == config.dataset.train
    assert params["hyperparameters.maxSteps"] == "8" and params["method.type"] == "lora"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6, 8]
    assert [m.value for m in history] == pytest.approx([e["loss"] for e in manifest["history"]])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "validation/loss")] == [4, 8]
    assert [m.step for m in client.get_metric_history(found.info.run_id, "test/loss")] == [8]
    assert found.data.metrics["baseline/test/loss"] == pytest.approx(manifest["metrics"]["baseline"]["test"]["loss"])
    assert "README.md" in {a.path for a in client.list_artifacts(found.info.run_id)}  # the output's model card
    assert not [e for e in events if e["event"] == "tracking"]  # no warning

    # The same run again (already published; a resumed run alike) finds its MLflow run by the run-id tag.
    run(config, report=events.append)
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == found.info.run_id and again.info.status == "FINISHED"

    # The token is in no event, no log line, no stored object, nothing MLflow holds.
    printed = capfd.readouterr()
    texts = [json.dumps(events), json.dumps(manifest), printed.out, printed.err, json.dumps(again.data.tags),
             json.dumps(again.data.params), mlflow_server.log()]
    assert not [t for t in texts if TOKEN in t]


def test_an_unreachable_server_costs_a_warning_not_the_run(make_config, unreachable_mlflow_uri):
    config = tracked_config(make_config, "support-mlflow-down", unreachable_mlflow_uri, max_steps=4)
    events: list[dict] = []
    manifest = run(config, report=events.append)
    assert manifest["steps"] == 4
    assert events[-1]["event"] != "tracking" or "not sent" in events[-1]["warning"]
    warnings = [e["warning"] for e in events if e["event"] == "tracking"]
    assert "unreachable" in warnings[0] and "training goes on" in warnings[0], warnings
    assert len([w for w in warnings if "unreachable" in w and "still" not in w]) == 1
    assert not [w for w in warnings if TOKEN in w]


def test_the_test_server_runs_the_tracking_api_only(mlflow_server):
    """The kit's server runs without MLflow's job runner and its huey consumers (eight interpreters more, about
    20 CPU-s at each start beside the tests): were MLflow to rename MLFLOW_SERVER_ENABLE_JOB_EXECUTION, this says so
    rather than the suite's time."""
    from pathlib import Path

    group = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) == \
                    mlflow_server.process.pid:
                group.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # ended meanwhile
            continue
    assert any(" mlflow server " in c for c in group) and any("uvicorn" in c for c in group), group
    assert not [c for c in group if "huey" in c or "job_runner" in c], group
