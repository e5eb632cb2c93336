"""A FineTuneJob can do no more than its author could (operator/kubetune_operator/policy.py).

* Pure: the rules in Python (the operator's own enforcement) and decide()'s PolicyDenied before any child.
* The generated policy files are up to date.
* The real API server: the ValidatingAdmissionPolicy of crds/policy/admission-policy.yaml, bound to two tenant
  namespaces, judges FineTuneJobs created by `alice` (`kubectl --as`), who may only create FineTuneJobs there
  (and read her team's Secret).
  Each forbidden case is refused with the rule's message; each case allowed by a grant of exactly the permission
  docs/security.md names is accepted; an allowed job trains to Succeeded. Without the policy, the operator
  itself fails a job that names a priority class with PolicyDenied, and creates no child.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from kubetune_api import FineTuneJobSpec
from kubetune_operator import policy
from kubetune_operator.reconcile import Observed, decide
from kubetune_operator.settings import OperatorSettings

from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e

pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

ROOT = Path(__file__).resolve().parents[2]
crd, fake_trainer, s3_inputs = e2e.crd, e2e.fake_trainer, e2e.s3_inputs  # test_e2e.py's fixtures
NOW = datetime(2026, 12, 1, tzinfo=UTC)
TRAINER = "ghcr.io/kubetune/trainer"
SETTINGS = policy.Settings(image_prefixes=(TRAINER, "registry.example.com/ml/"), credentials_secret="platform-s3",
                           credentials_namespaces=("team-a",))


def operator(image: str) -> OperatorSettings:
    """The operator's settings: its trainer image, and SETTINGS as its policy."""
    return OperatorSettings(trainer_image=image, policy=SETTINGS)


def spec(**extra) -> dict:
    return {"baseModel": {"uri": "s3://models/tiny/"}, "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/run/"}, "storage": {"secretRef": {"name": "own-s3"}}, **extra}


def violations(namespace: str = "team-b", author_checked: bool = True, **extra) -> list[str]:
    return policy.violations(namespace, FineTuneJobSpec.model_validate(spec(**extra)), SETTINGS, author_checked)


# -- the rules in Python ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("image", "allowed"), [
    ("ghcr.io/kubetune/trainer", True), ("ghcr.io/kubetune/trainer:0.2.0", True),
    ("ghcr.io/kubetune/trainer@sha256:" + "a" * 64, True), ("registry.example.com/ml/custom:1", True),
    ("ghcr.io/kubetune/trainer-evil:1", False), ("ghcr.io/kubetune/trainerx", False),
    ("registry.example.com/mlx/custom:1", False), ("docker.io/library/python:3.11", False),
])
def test_image_prefixes(image, allowed):
    assert policy.image_allowed(image, SETTINGS.image_prefixes) is allowed
    assert (policy.IMAGE in violations(image=image)) is not allowed


def test_repository_of_an_image():
    assert policy.repository("ghcr.io/kubetune/trainer:0.1.0") == "ghcr.io/kubetune/trainer"
    assert policy.repository("localhost:5000/trainer") == "localhost:5000/trainer"
    assert policy.repository("localhost:5000/trainer:1@sha256:" + "0" * 64) == "localhost:5000/trainer"


def test_default_credentials_only_in_allowed_namespaces():
    platform = {"storage": {"secretRef": {"name": "platform-s3"}}}
    assert violations("team-b", **platform) == [policy.CREDENTIALS]
    assert violations("team-a", **platform) == []
    # no credentials at all: the operator would fill the platform's in
    assert violations("team-b", storage={}) == [policy.CREDENTIALS]
    assert violations("team-b", storage={"serviceAccountName": "reader"}) == []
    assert violations("team-b") == []  # its own Secret
    everywhere = policy.Settings(image_prefixes=(TRAINER,), credentials_secret="platform-s3",
                                 credentials_namespaces=("*",))
    assert policy.violations("x", FineTuneJobSpec.model_validate(spec(**platform)), everywhere, True) == []


def test_trust_remote_code_needs_the_platforms_consent():
    model = {"baseModel": {"uri": "s3://models/tiny/", "trustRemoteCode": True}}
    assert violations(**model) == [policy.REMOTE_CODE]
    allowing = policy.Settings(image_prefixes=(TRAINER,), allow_trust_remote_code=True)
    assert policy.violations("x", FineTuneJobSpec.model_validate(spec(**model)), allowing, True) == []


def test_without_the_admission_policy_named_objects_are_refused():
    named = {"storage": {"serviceAccountName": "reader"}, "scheduling": {"priorityClassName": "high"},
             "output": {"uri": "pvc://shared/out/"}}
    assert violations(**named) == []  # the API server checked the author
    assert violations(author_checked=False, **named) == [
        policy.SERVICE_ACCOUNT + policy.UNCHECKED, policy.CLAIM + policy.UNCHECKED, policy.PRIORITY + policy.UNCHECKED]
    assert violations(author_checked=False) == [policy.SECRET + policy.UNCHECKED]  # a Secret of its own
    platform = {"storage": {"secretRef": {"name": "platform-s3"}}}  # the platform's: nothing to check
    assert violations("team-a", author_checked=False, **platform) == []


def body(spec_: dict, status: dict | None = None) -> dict:
    return {"metadata": {"name": "j", "namespace": "team-b", "uid": "u-1", "generation": 1,
                         "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": spec_, "status": status or {}}


def test_decide_fails_policydenied_before_any_child():
    checked = Observed(admission_policy="2026-11-30T12:00:00Z")  # the job's own Secret: its author was checked
    d = decide(body(spec(image="docker.io/x/miner:1")), checked, NOW, operator("ghcr.io/kubetune/trainer:0.1.0"))
    assert d.phase == "Failed" and d.status["reason"] == "PolicyDenied" and not d.create
    assert d.status["message"] == policy.IMAGE
    assert ("Warning", "PolicyDenied", f"Failed: {policy.IMAGE}") in d.events
    ok = decide(body(spec()), checked, NOW, operator("ghcr.io/kubetune/trainer:0.1.0"))
    assert ok.phase == "Pending" and {o["kind"] for o in ok.create} == {"ConfigMap", "Job"}


def test_decide_checks_authors_only_through_the_admission_policy():
    named = body(spec(scheduling={"priorityClassName": "high"}))
    assert decide(named, Observed(), NOW, operator(TRAINER)).status["reason"] == "PolicyDenied"
    checked = Observed(admission_policy="2026-11-30T12:00:00Z")  # the policy, as it is, predates the job
    assert decide(named, checked, NOW, operator(TRAINER)).phase == "Pending"
    # a job created before the policy (or before its namespace was bound) was never checked
    for since in ("2026-12-01T00:00:00Z", "2026-12-01T08:00:00Z"):
        late = Observed(admission_policy=since)
        assert decide(named, late, NOW, operator(TRAINER)).status["reason"] == "PolicyDenied"
    assert policy.needs_admission_check(named, SETTINGS)
    assert not policy.needs_admission_check(body(spec(storage={"secretRef": {"name": "platform-s3"}})), SETTINGS)
    assert policy.needs_admission_check(body(spec()), SETTINGS)  # its own Secret
    started = body(spec(scheduling={"priorityClassName": "high"}),
                   {"phase": "Validating", "conditions": [{"type": "Validated", "status": "Unknown",
                                                            "lastTransitionTime": "2026-12-01T00:00:00Z"}]})
    assert not policy.needs_admission_check(started, SETTINGS)  # a job that started keeps running
    assert decide(started, Observed(), NOW, operator(TRAINER)).status.get("reason") != "PolicyDenied"


def test_the_generated_policy_files_are_up_to_date(tmp_path):
    policy.write(tmp_path)
    for path in policy.FILES:
        assert (tmp_path / path).read_text() == (ROOT / path).read_text(), f"{path} is stale: run `make crds`"


# -- the real API server ---------------------------------------------------------------------------------------

ALICE = "alice"
NAME = f"{policy.POLICY}-{uuid.uuid4().hex[:6]}"  # of the policy and its binding: the control plane is shared
PRIORITY = "team-high"


@pytest.fixture(scope="module")
def tenants(control_plane, crd):
    """Namespaces team-a (may use the platform's credentials) and team-b, where alice may create FineTuneJobs
    and read the Secret own-s3, and nothing else."""
    names = {k: f"{k}-{uuid.uuid4().hex[:6]}" for k in ("team-a", "team-b")}
    for ns in names.values():
        kubectl(control_plane, "create", "namespace", ns)
        kubectl(control_plane, "label", "namespace", ns, "kubetune.io/policy-test=true")
        kubectl(control_plane, "create", "role", "ftj-author", "-n", ns, "--verb=create",
                "--resource=finetunejobs.kubetune.io")
        kubectl(control_plane, "create", "rolebinding", "ftj-author", "-n", ns, "--role=ftj-author",
                f"--user={ALICE}")
        # her team's Secret, which spec() names
        kubectl(control_plane, "create", "role", "own-s3-reader", "-n", ns, "--verb=get", "--resource=secrets",
                "--resource-name=own-s3")
        kubectl(control_plane, "create", "rolebinding", "own-s3-reader", "-n", ns, "--role=own-s3-reader",
                f"--user={ALICE}")
    kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": PRIORITY},
        "value": 1000}))
    yield names
    for ns in names.values():
        kubectl(control_plane, "delete", "namespace", ns, "--wait=false")


@pytest.fixture(scope="module")
def admission(control_plane, tenants):
    """crds/policy/admission-policy.yaml, its params for the tenants and its binding limited to them (the control
    plane is shared with other test modules); removed afterwards."""
    docs = list(yaml.safe_load_all((ROOT / "crds" / "policy" / "admission-policy.yaml").read_text()))
    vap, binding, params = docs
    ns = f"kubetune-system-{uuid.uuid4().hex[:6]}"
    kubectl(control_plane, "create", "namespace", ns)
    params["metadata"]["namespace"] = binding["spec"]["paramRef"]["namespace"] = ns
    vap["metadata"]["name"] = binding["metadata"]["name"] = binding["spec"]["policyName"] = NAME
    params["data"] = policy.Settings(image_prefixes=(TRAINER,), credentials_secret="s3-credentials",
                                     credentials_namespaces=(tenants["team-a"],)).params()
    binding["spec"]["matchResources"] = {"namespaceSelector": {"matchLabels": {"kubetune.io/policy-test": "true"}}}
    for doc in (vap, params, binding):
        kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps(doc))

    def enforced() -> bool:  # the API server's policy informers take a moment
        out = create(control_plane, tenants["team-b"], "probe", spec(image="docker.io/x/miner:1"), dry_run=True)
        return out.returncode != 0 and policy.IMAGE in out.stderr

    wait_for("the admission policy to be enforced", enforced, timeout=60)
    yield binding["metadata"]["name"]
    for kind, doc in (("validatingadmissionpolicybinding", binding), ("validatingadmissionpolicy", vap)):
        kubectl(control_plane, "delete", kind, doc["metadata"]["name"], "--wait=false")
    kubectl(control_plane, "delete", "namespace", ns, "--wait=false")


def create(cp, namespace: str, name: str, spec_: dict, user: str = ALICE, dry_run: bool = False):
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec_}
    return kubectl(cp, "create", "-n", namespace, "--as", user, *(["--dry-run=server"] if dry_run else []),
                   "-f", "-", stdin=json.dumps(doc), check=False)


def grant(cp, namespace: str, name: str, verb: str, resource: str, resource_name: str, cluster: bool = False):
    """A (Cluster)Role with one rule for alice, applied as an object: `kubectl create role` refuses verbs that
    the resource's discovery does not list (`use` is RBAC's alone)."""
    plural, _, group = resource.partition(".")
    kind, meta = ("ClusterRole", {"name": name}) if cluster else ("Role", {"name": name, "namespace": namespace})
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
            "rules": [{"apiGroups": [group], "resources": [plural], "verbs": [verb], "resourceNames": [resource_name]}]}
    bind = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": f"{kind}Binding", "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": ALICE}]}
    for doc in (role, bind):
        kubectl(cp, "apply", "-f", "-", stdin=json.dumps(doc))


@pytest.fixture(scope="module")
def policy_operator(control_plane, crd, tenants, s3_server, tmp_path_factory):
    """The operator as the chart configures it: it trusts the API server for authors once the binding exists; its
    default credentials are for the S3 server's endpoint."""
    env = e2e.operator_env(control_plane, KUBETUNE_STORAGE_SECRET_NAME="s3-credentials",
                           KUBETUNE_STORAGE_ENDPOINT=s3_server.endpoint,
                           KUBETUNE_POLICY_CREDENTIALS_NAMESPACES=tenants["team-a"], KUBETUNE_POLICY_BINDING=NAME)
    yield from e2e.run_operator(tmp_path_factory, env)


def job_spec(inputs: dict, image: str, **extra) -> dict:
    out = e2e.training_spec(inputs, image, hyperparameters={"maxSteps": 2}, **extra)
    out["storage"] = {"endpoint": inputs["endpoint"]}  # the platform's credentials
    out["resources"] = {"workers": 1, "gpusPerWorker": 0}
    return out


@pytest.mark.cluster
@pytest.mark.e2e
def test_without_the_policy_the_operator_refuses_what_it_cannot_check(control_plane, node_agent, tenants,
                                                                      policy_operator, s3_inputs, fake_trainer):
    ns = tenants["team-a"]
    e2e.submit(control_plane, ns, "unchecked", job_spec(s3_inputs, fake_trainer,
                                                         scheduling={"priorityClassName": PRIORITY}))
    status = e2e.wait_phase(control_plane, ns, "unchecked", ("Failed", "Running", "Succeeded"), timeout=60)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "PolicyDenied", status
    assert status["message"] == policy.PRIORITY + policy.UNCHECKED
    assert get_json(control_plane, "jobs,configmaps", "-n", ns, "-l", "kubetune.io/finetunejob=unchecked")["items"] \
        == []
    e2e.submit(control_plane, tenants["team-b"], "no-credentials", job_spec(s3_inputs, fake_trainer))
    status = e2e.wait_phase(control_plane, tenants["team-b"], "no-credentials", ("Failed", "Running"),
                            timeout=60)["status"]
    assert status["reason"] == "PolicyDenied" and status["message"] == policy.CREDENTIALS


FORBIDDEN = {  # case -> (namespace key, spec changes, the rule's message)
    "image": ("team-b", {"image": "docker.io/x/miner:1"}, policy.IMAGE),
    "service account": ("team-b", {"storage": {"serviceAccountName": "builder"}}, policy.SERVICE_ACCOUNT),
    "pvc": ("team-b", {"output": {"uri": "pvc://shared-data/out/"}}, policy.CLAIM),
    "priority class": ("team-b", {"scheduling": {"priorityClassName": "system-cluster-critical"}}, policy.PRIORITY),
    "remote code": ("team-b", {"baseModel": {"uri": "s3://models/tiny/", "trustRemoteCode": True}},
                    policy.REMOTE_CODE),
    "default credentials": ("team-b", {"storage": {"secretRef": {"name": "s3-credentials"}}}, policy.CREDENTIALS),
    "no credentials": ("team-b", {"storage": {}}, policy.CREDENTIALS),
    "secret": ("team-b", {"storage": {"secretRef": {"name": "other-team-s3"}}}, policy.SECRET),
}


AUTHOR_RULES = (policy.SERVICE_ACCOUNT, policy.CLAIM, policy.PRIORITY, policy.SECRET)


@pytest.mark.parametrize("case", FORBIDDEN)
def test_the_operator_refuses_the_same_cases_with_the_same_message(case):
    """What the API server refuses below, the operator refuses too (for authors: whenever it cannot check them)."""
    _, changes, message = FORBIDDEN[case]
    settings = policy.Settings(image_prefixes=(TRAINER,), credentials_secret="s3-credentials",
                               credentials_namespaces=("team-a",))
    job = FineTuneJobSpec.model_validate(spec(**changes))
    author = message in AUTHOR_RULES
    own = [policy.SECRET + policy.UNCHECKED] if "storage" not in changes else []  # spec()'s own-s3
    assert policy.violations("team-b", job, settings, author_checked=False) == [
        message + policy.UNCHECKED if author else message] + own
    assert policy.violations("team-b", job, settings, author_checked=True) == ([] if author else [message])


@pytest.mark.cluster
def test_each_forbidden_case_is_refused_with_the_rules_message(control_plane, tenants, admission):
    wrong = {}
    for case, (ns, changes, message) in FORBIDDEN.items():
        out = create(control_plane, tenants[ns], f"denied-{case.replace(' ', '-')}", spec(**changes))
        if out.returncode == 0 or message not in " ".join(out.stderr.split()):
            wrong[case] = out.stderr or out.stdout
    assert not wrong
    names = {j["metadata"]["name"] for j in get_json(control_plane, "ftj", "-n", tenants["team-b"])["items"]}
    assert not {n for n in names if n.startswith("denied-")}


@pytest.mark.cluster
def test_each_case_is_allowed_with_exactly_the_documented_permission(control_plane, tenants, admission):
    a, b = tenants["team-a"], tenants["team-b"]
    grant(control_plane, b, "alice-token", "create", "serviceaccounts/token", "builder")
    grant(control_plane, b, "alice-claim", "use", "persistentvolumeclaims", "shared-data")
    grant(control_plane, b, f"alice-{b}-priority", "use", "priorityclasses.scheduling.k8s.io", PRIORITY, cluster=True)
    allowed = {  # case -> (namespace, spec changes)
        "trainer image": (b, {"image": f"{TRAINER}:0.2.0"}),
        "service account": (b, {"storage": {"serviceAccountName": "builder"}}),
        "pvc": (b, {"output": {"uri": "pvc://shared-data/out/"}}),
        "priority class": (b, {"scheduling": {"priorityClassName": PRIORITY}}),
        "default credentials": (a, {"storage": {"secretRef": {"name": "s3-credentials"}}}),
    }
    refused = {case: out.stderr for case, (ns, changes) in allowed.items()
               if (out := create(control_plane, ns, "allowed", spec(**changes), dry_run=True)).returncode != 0}
    assert not refused
    # the grants are exact: another ServiceAccount, claim or priority class is still refused
    still = [create(control_plane, b, "x", spec(**changes), dry_run=True).returncode != 0 for changes in (
        {"storage": {"serviceAccountName": "other"}}, {"output": {"uri": "pvc://other/out/"}},
        {"scheduling": {"priorityClassName": "system-cluster-critical"}})]
    assert all(still)
    # a user who may create pods could do all of it directly
    kubectl(control_plane, "create", "rolebinding", "bob-edit", "-n", b, "--clusterrole=edit", "--user=bob")
    kubectl(control_plane, "create", "rolebinding", "bob-ftj", "-n", b, "--role=ftj-author", "--user=bob")
    out = create(control_plane, b, "bob", spec(storage={"serviceAccountName": "any"},
                                               output={"uri": "pvc://any-claim/out/"}), user="bob", dry_run=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.cluster
@pytest.mark.e2e
def test_an_allowed_job_by_the_restricted_author_trains(control_plane, node_agent, tenants, admission,
                                                        policy_operator, s3_inputs, fake_trainer):
    ns = tenants["team-a"]
    e2e.credentials(control_plane, ns)
    grant(control_plane, ns, f"alice-{ns}-priority", "use", "priorityclasses.scheduling.k8s.io", PRIORITY,
          cluster=True)
    out = create(control_plane, ns, "allowed", job_spec(s3_inputs, fake_trainer,
                                                        scheduling={"priorityClassName": PRIORITY}))
    assert out.returncode == 0, out.stderr
    done = e2e.wait_phase(control_plane, ns, "allowed", ("Succeeded", "Failed"), timeout=180)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    pod = get_json(control_plane, "job", "-n", ns, "allowed-train-1")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == PRIORITY
