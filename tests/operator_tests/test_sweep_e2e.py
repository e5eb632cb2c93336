"""FineTuneSweep on the real API server: the CRD's CEL rules refuse each bad spec naming the field; with the
operator and the real trainer, a small sweep runs its trials to the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests.test_sweep_api import BAD, sweep

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

ROOT = Path(__file__).resolve().parents[2]
CRDS = [ROOT / "crds" / "kubetune.io_finetunejobs.yaml", ROOT / "crds" / "kubetune.io_finetunesweeps.yaml"]


@pytest.fixture(scope="module")
def crds(control_plane):
    for path in CRDS:
        kubectl(control_plane, "apply", "--server-side", "-f", str(path))

    def established() -> bool:
        found = [get_json(control_plane, "crd", name) for name in ("finetunejobs.kubetune.io",
                                                                   "finetunesweeps.kubetune.io")]
        return all(any(c["type"] == "Established" and c["status"] == "True"
                       for c in (crd.get("status") or {}).get("conditions") or []) for crd in found)

    wait_for("the CRDs to be established", established, timeout=60)


@pytest.mark.parametrize("name", BAD)
def test_each_bad_spec_is_refused_naming_the_field(control_plane, crds, namespace, name):
    doc, message, field = BAD[name]
    out = kubectl(control_plane, "create", "-n", namespace, "--dry-run=server", "-f", "-",
                  stdin=json.dumps(doc), check=False)
    assert out.returncode != 0, f"{name} was accepted"
    assert message in out.stderr and field in out.stderr, out.stderr


def test_a_valid_sweep_is_accepted_defaulted_and_listed(control_plane, crds, namespace):
    kubectl(control_plane, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(sweep()))
    spec = get_json(control_plane, "fts", "-n", namespace, "search")["spec"]
    assert (spec["algorithm"], spec["earlyStopping"], spec["maxTrials"], spec["parallelTrials"]) == (
        "tpe", "asha", 10, 2)
    assert spec["template"]["hyperparameters"]["scheduler"] == "cosine"  # the template's defaults too
    header = kubectl(control_plane, "get", "fts", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "TRIALS", "BEST", "METRIC", "AGE"]
