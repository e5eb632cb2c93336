"""A FineTuneSweep can do no more than its author (issue 30): the admission policy judges a sweep's template
against the user who creates the sweep, exactly as it judges a FineTuneJob's spec, and admits the trials the
operator creates for it; no user can pass a job of their own off as a trial.

The unit tests check the pure parts (the rules read no field a parameter can set; the operator's own refusal,
PolicyDenied, when it cannot check the author). The cluster tests run against the real API server with the
policy of crds/policy/admission-policy.yaml; the tenant is `mallory` (`kubectl --as`), who may create
FineTuneSweeps and FineTuneJobs in her namespace and read the Secret team-s3, nothing else; the operator's sweep
reconcile (sweeps.reconcile) runs as the user `kubetune-operator`, with the chart's rights on sweeps and jobs and
no right on any Secret.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta

import kubernetes
import pytest
from kubetune_api import TUNABLE
from kubetune_operator import kube, policy, sweeps
from kubetune_operator import sweep as sw
from kubetune_operator.conditions import rfc3339
from kubetune_operator.settings import OperatorSettings

from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests.test_sweep_e2e import crds  # noqa: F401 - the fixture that applies both CRDs
from tests.security.test_storage_access import PLATFORM, PLATFORM_SECRET, TENANT, install_policy, refused_with

pytest_plugins = ["kubetune_dev.cluster.pytest_plugin"]

OPERATOR = "kubetune-operator"  # the user the operator's sweep reconcile runs as
LABEL = "kubetune.io/sweep-admission-test"  # the namespaces the policy of this module is bound to
CREATED = datetime(2026, 1, 2, tzinfo=UTC)


def template(ns: str, **extra) -> dict:
    """A sweep template of namespace `ns` whose data is in its bucket (PLATFORM's allowed prefix)."""
    return {"baseModel": {"uri": f"s3://ml-{ns}/models/tiny/"},
            "dataset": {"train": f"s3://ml-{ns}/data/train.jsonl", "validation": f"s3://ml-{ns}/data/val.jsonl"},
            "hyperparameters": {"maxSteps": 2}, **extra}


def fts(ns: str, name: str = "search", output: str = "", **extra) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
            "metadata": {"name": name, "namespace": ns, "uid": "u-1", "creationTimestamp": rfc3339(CREATED)},
            "spec": {"template": template(ns, **extra), "earlyStopping": "none", "maxTrials": 2,
                     "parameters": [{"path": "hyperparameters.learningRate", "values": [1e-4, 1e-3]}],
                     "output": {"uri": output or f"s3://ml-{ns}/sweeps/{name}/"}}}


def settings(binding: str = "") -> OperatorSettings:
    return OperatorSettings(storage_secret_name=PLATFORM_SECRET, policy=policy.Settings(
        image_prefixes=PLATFORM.image_prefixes, credentials_secret=PLATFORM_SECRET, credentials_namespaces=("*",),
        storage_prefixes=PLATFORM.storage_prefixes, binding=binding))


def team_secret() -> dict:
    return {"storage": {"secretRef": {"name": "team-s3"}}}


# -- the pure parts ----------------------------------------------------------------------------------------------

def test_no_parameter_can_set_a_field_the_rules_read():
    """Every trial asks for what its template does: a parameter may set only TUNABLE fields, and the rules (the
    admission policy's CEL, over `variables.spec`) read only CHECKED_FIELDS, which no tunable path is under."""
    read = set(re.findall(r"variables\.spec\.\??(\w+)", json.dumps(policy.admission_policy())))
    assert read and read <= set(policy.CHECKED_FIELDS)
    assert not {path.split(".")[0] for path in TUNABLE} & set(policy.CHECKED_FIELDS)


def test_the_operator_refuses_a_sweep_whose_author_it_cannot_check():
    """Attack: on a cluster without the admission policy (or a sweep created before it was in force), mallory's
    sweep names another team's Secret; the operator would create the trials unchecked. Answer: before any trial,
    the sweep fails PolicyDenied naming the template's field and saying to install the policy. With the policy
    in force since before the sweep was created, its trials are created."""
    body = fts("ml", **team_secret())
    for since in (None, rfc3339(CREATED + timedelta(seconds=1))):
        assert policy.sweep_needs_admission_check(body, settings().policy)
        d = sw.decide(body, [], CREATED, settings(), admission_policy=since)
        assert (d.status["phase"], d.status["reason"]) == ("Failed", "PolicyDenied") and not d.create
        assert d.status["message"] == policy.sweep_message(policy.SECRET + policy.UNCHECKED)
        assert d.events == [("Warning", "PolicyDenied", d.status["message"])]
    d = sw.decide(body, [], CREATED, settings(), admission_policy=rfc3339(CREATED - timedelta(seconds=1)))
    assert d.status["phase"] == "Running" and [j["metadata"]["name"] for j in d.create] == ["search-0", "search-1"]
    assert all(j["metadata"]["labels"] == {sw.SWEEP_LABEL: "search"} for j in d.create)
    plain = fts("ml")  # nothing that needs its author: no policy needed
    assert not policy.sweep_needs_admission_check(plain, settings().policy)
    assert len(sw.decide(plain, [], CREATED, settings()).create) == 2


def test_the_sweeps_output_is_judged_with_its_template():
    """The trials publish and cache under the sweep's output.uri: it is under the namespace's prefixes, and a
    pvc:// one names a claim its author must be allowed to use, like a job's output."""
    outside = fts("ml", output="s3://ml-other/sweep/")
    assert sw.decide(outside, [], CREATED, settings()).status["message"] == policy.sweep_message(
        policy.storage_prefix_message(["s3://ml-other/sweep/"], ["s3://ml-ml/"]))
    claim = fts("ml", output="pvc://shared/sweep/")
    spec = sw.FineTuneSweepSpec.model_validate(claim["spec"])
    platform = policy.Settings(image_prefixes=(), credentials_secret=PLATFORM_SECRET, credentials_namespaces=("*",))
    assert policy.sweep_violations("ml", spec, platform, author_checked=False) == [
        policy.sweep_message(policy.CLAIM + policy.UNCHECKED)]
    assert policy.sweep_violations("ml", spec, platform, author_checked=True) == []


# -- the real API server -----------------------------------------------------------------------------------------

def apply(cp, doc: dict) -> None:
    kubectl(cp, "apply", "-f", "-", stdin=json.dumps(doc))


def role(cp, kind: str, name: str, namespace: str, user: str, rules: list[dict]) -> None:
    """A (Cluster)Role and its binding for `user`, applied as objects (`kubectl create role` refuses verbs that
    discovery does not list, such as `trial`)."""
    meta = {"name": name, **({"namespace": namespace} if kind == "Role" else {})}
    apply(cp, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "rules": rules})
    apply(cp, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": f"{kind}Binding", "metadata": meta,
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})


def rule(resource: str, *verbs: str, group: str = "kubetune.io", names: tuple[str, ...] = ()) -> dict:
    return {"apiGroups": [group], "resources": [resource], "verbs": list(verbs),
            **({"resourceNames": list(names)} if names else {})}


@pytest.fixture(scope="module")
def tenant(control_plane, crds):  # noqa: F811 - crds is the fixture
    """mallory's namespace, with the Secrets team-s3 (hers: she may get it) and finance-s3 (another team's), and
    the operator's rights there (the chart's on sweeps and jobs; none on Secrets or pods)."""
    ns = f"sweeps-{uuid.uuid4().hex[:6]}"
    kubectl(control_plane, "create", "namespace", ns)
    kubectl(control_plane, "label", "namespace", ns, f"{LABEL}=true")
    for secret in ("team-s3", "finance-s3"):
        kubectl(control_plane, "create", "secret", "generic", secret, "-n", ns, "--from-literal=AWS_ACCESS_KEY_ID=x")
    role(control_plane, "Role", "author", ns, TENANT, [
        rule("finetunesweeps", "create", "get"), rule("finetunejobs", "create"),
        rule("secrets", "get", group="", names=("team-s3",))])
    role(control_plane, "Role", "operator", ns, OPERATOR, [
        rule("finetunesweeps", "get", "list", "watch", policy.TRIAL_VERB), rule("finetunesweeps/status", "patch"),
        rule("finetunesweeps/finalizers", "update"), rule("finetunejobs", "get", "list", "watch", "create", "patch")])
    yield ns
    kubectl(control_plane, "delete", "namespace", ns, "--wait=false")


@pytest.fixture(scope="module")
def admission(control_plane, tenant):
    """The admission policy with PLATFORM's parameters, bound to tenant; the operator may read it (by name)."""
    name = f"{policy.POLICY}-{uuid.uuid4().hex[:6]}"
    remove = install_policy(control_plane, PLATFORM, name, label=LABEL)
    role(control_plane, "ClusterRole", name, "", OPERATOR, [
        rule(r, "get", group="admissionregistration.k8s.io", names=(name,))
        for r in ("validatingadmissionpolicies", "validatingadmissionpolicybindings")])

    def enforced() -> bool:  # the API server's policy informers take a moment
        return refused_with(create(control_plane, fts(tenant, image="docker.io/x/miner:1")), "spec.template.image")

    wait_for("the admission policy to be enforced", enforced, timeout=60)
    time.sleep(1.1)  # sweeps created from now on are newer than the binding (the API's times are whole seconds)
    yield name
    remove()
    kubectl(control_plane, "delete", "clusterrolebinding,clusterrole", name, "--wait=false")


def create(cp, doc: dict, user: str = TENANT, dry_run: bool = True):
    doc = {**doc, "metadata": {k: v for k, v in doc["metadata"].items() if k not in ("uid", "creationTimestamp")}}
    return kubectl(cp, "create", "--as", user, *(["--dry-run=server"] if dry_run else []), "-f", "-",
                   stdin=json.dumps(doc), check=False)


def operator_api(cp) -> kube.Kube:
    """The operator's API client, as the user OPERATOR."""
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=config)
    client = kubernetes.client.ApiClient(config)
    client.set_default_header("Impersonate-User", OPERATOR)
    return kube.Kube(client)


@pytest.mark.cluster
def test_a_sweep_naming_what_its_author_may_not_use_is_refused_at_apply(control_plane, tenant, admission):
    """Attack: mallory, who may not read finance-s3 nor mint a ServiceAccount's token, names them in a sweep's
    template, for the operator to put into the trials' pods. Answer: the API server refuses the sweep with the
    job rule's message, naming the template's field; her own team-s3 is admitted."""
    for changes, message in (({"storage": {"secretRef": {"name": "finance-s3"}}}, policy.SECRET),
                             ({"storage": {"serviceAccountName": "builder"}}, policy.SERVICE_ACCOUNT)):
        out = create(control_plane, fts(tenant, **changes))
        assert refused_with(out, policy.sweep_message(message)), out.stderr
    out = create(control_plane, fts(tenant, **team_secret()))
    assert out.returncode == 0, out.stderr


@pytest.mark.cluster
def test_an_admitted_sweeps_trials_are_created_and_admitted(control_plane, tenant, admission, monkeypatch):
    """mallory's sweep names team-s3, which she may read and the operator may not: the operator creates its
    trials (the sweep's label, with the verb `trial` on the sweep), and the API server admits them: no
    InvalidChildSpec. The same job without the sweep's label, from the operator, is judged against the operator
    and refused."""
    out = create(control_plane, fts(tenant, **team_secret()), dry_run=False)
    assert out.returncode == 0, out.stderr
    events = []
    monkeypatch.setattr(sweeps.kopf, "event", lambda body, type, reason, message: events.append((reason, message)))
    api = operator_api(control_plane)
    d = sweeps.reconcile(api, tenant, "search", settings(binding=admission))
    assert d is not None and [j["metadata"]["name"] for j in d.create] == ["search-0", "search-1"]
    status = get_json(control_plane, "fts", "-n", tenant, "search")["status"]
    assert (status["phase"], status["reason"]) == ("Running", "Searching"), (status, events)
    trials = get_json(control_plane, "ftj", "-n", tenant, "-l", f"{sw.SWEEP_LABEL}=search")["items"]
    assert sorted(t["metadata"]["name"] for t in trials) == ["search-0", "search-1"]
    assert all(t["spec"]["storage"]["secretRef"]["name"] == "team-s3" for t in trials)
    unlabelled = {**d.create[0], "metadata": {"name": "not-a-trial", "namespace": tenant}}
    assert refused_with(create(control_plane, unlabelled, user=OPERATOR), policy.SECRET)


@pytest.mark.cluster
def test_a_user_cannot_pass_a_job_off_as_a_trial(control_plane, tenant, admission):
    """Attack: mallory creates a FineTuneJob labelled as a trial of a sweep (and owned by it), naming finance-s3,
    hoping the policy skips her as it skips the operator's trials. Answer: a trial is trusted only if its creator
    has the verb `trial` on that sweep; she has not, so the job is judged against her and refused."""
    body = fts(tenant, storage={"secretRef": {"name": "finance-s3"}})
    doc = sw.trial_job(body, sw.FineTuneSweepSpec.model_validate(body["spec"]), 7, {})
    doc["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] = False  # needs more than mallory's rights
    out = create(control_plane, doc)
    assert refused_with(out, policy.SECRET), out.stderr
