"""Scheduling and resource fields follow the author (issue 27, item 3), and a platform can make every job go
through Kueue (item 7, `policy.requireQueue`).

The operator, not the author, creates the training pods, so whatever a FineTuneJob says about where and how its
pods run would otherwise be done with the operator's rights. A tenant who may create FineTuneJobs but not pods
tries to:

* select nodes the platform keeps for others (`resources.nodeSelector`);
* tolerate every taint (`tolerations: [{operator: Exists}]`) and so land on tainted, reserved nodes;
* keep other tenants' pods off the nodes with a required `podAntiAffinity` whose `namespaceSelector: {}` matches
  every namespace (`resources.affinity`);
* request a resource the platform does not hand out as a GPU (`resources.gpuResourceName`);
* hold a node for a day after being told to stop (`runPolicy.terminationGracePeriodSeconds: 86400`), at creation
  or by raising it later (runPolicy stays mutable);
* skip the queue where the platform requires Kueue (no `scheduling.queueName`).

The answer: what the platform's policy allows (`policy.allowedNodeSelectors`, `allowedTolerations`,
`allowedGPUResourceNames`, `maxTerminationGracePeriodSeconds`) any author may set; anything else needs the
author's right to create pods in the namespace (they could create such a pod directly), checked by the API server
(the admission policy, `authorizer`) against the user who creates the job, or who raises its grace period. Without
the admission policy the operator cannot know the author and fails such a job `PolicyDenied` before any child
exists (for the grace period: before each training Job). With `policy.requireQueue`, a job without a queue is
refused, whoever its author.
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

pytest_plugins = ["kubetune_dev.cluster.pytest_plugin"]

ROOT = Path(__file__).resolve().parents[2]
crd = e2e.crd  # the fixture that applies the CRD and waits until it is established
NOW = datetime(2026, 12, 1, tzinfo=UTC)
TRAINER = "ghcr.io/kubetune/trainer"
SCHEDULING = policy.Scheduling(node_selectors=("kubetune.io/pool=training", "topology.kubernetes.io/zone"),
                               tolerations=("nvidia.com/gpu:NoSchedule", "kubetune.io/pool=training"))
SETTINGS = policy.Settings(image_prefixes=(TRAINER,), scheduling=SCHEDULING)
QUEUED = policy.Settings(image_prefixes=(TRAINER,), scheduling=policy.Scheduling(require_queue=True))

ANTI_AFFINITY = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
    {"labelSelector": {}, "namespaceSelector": {}, "topologyKey": "kubernetes.io/hostname"}]}}
ATTACKS = {  # what the tenant sets -> the rule's message
    "a node pool kept for others": ({"resources": {"nodeSelector": {"kubetune.io/pool": "inference"}}},
                                    policy.NODE_SELECTOR),
    "a toleration of every taint": ({"resources": {"tolerations": [{"operator": "Exists"}]}}, policy.TOLERATION),
    "a toleration of every effect": ({"resources": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}},
                                     policy.TOLERATION),
    "anti-affinity against every namespace": ({"resources": {"affinity": ANTI_AFFINITY}}, policy.AFFINITY),
    "another resource as the GPU": ({"resources": {"gpuResourceName": "example.com/fpga"}}, policy.GPU_RESOURCE),
    "a day of grace": ({"runPolicy": {"terminationGracePeriodSeconds": 86400}}, policy.GRACE),
}
ALLOWED = {  # within SCHEDULING and the defaults: any author
    "allowed node selectors": {"resources": {"nodeSelector": {"kubetune.io/pool": "training",
                                                              "topology.kubernetes.io/zone": "eu-1a"}}},
    "allowed tolerations": {"resources": {"tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},  # narrower: one value
        {"key": "kubetune.io/pool", "operator": "Equal", "value": "training", "effect": "NoExecute",
         "tolerationSeconds": 60}]}},
    "the default GPU resource": {"resources": {"gpuResourceName": "nvidia.com/gpu", "gpusPerWorker": 2}},
    "no GPU: the name is not used": {"resources": {"gpuResourceName": "example.com/fpga", "gpusPerWorker": 0}},
    "the maximum grace period": {"runPolicy": {"terminationGracePeriodSeconds": 3600}},
}


def spec(**extra) -> dict:
    return {"baseModel": {"uri": "s3://models/tiny/"}, "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/run/"}, "storage": {}, **extra}


def violations(changes: dict, author_checked: bool, settings: policy.Settings = SETTINGS) -> list[str]:
    return policy.violations("team-a", FineTuneJobSpec.model_validate(spec(**changes)), settings, author_checked)


def body(spec_: dict, status: dict | None = None) -> dict:
    return {"metadata": {"name": "j", "namespace": "team-a", "uid": "u-1", "generation": 1,
                         "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": spec_, "status": status or {}}


def operator(settings: policy.Settings = SETTINGS) -> OperatorSettings:
    return OperatorSettings(trainer_image=f"{TRAINER}:0.1.0", policy=settings)


# -- the rules in Python: the operator's refusal where the admission policy is absent ----------------------------

@pytest.mark.parametrize("attack", ATTACKS)
def test_without_the_policy_the_operator_refuses_each_attack(attack):
    """The tenant sets a scheduling field outside the platform's allow-lists on a cluster without the admission
    policy: the operator cannot tell who the author is, so it refuses, saying to install the policy. Where the
    API server checked the author (the policy was in force), the operator lets the job through."""
    changes, message = ATTACKS[attack]
    assert violations(changes, author_checked=False) == [message + policy.UNCHECKED]
    assert violations(changes, author_checked=True) == []


@pytest.mark.parametrize("case", ALLOWED)
def test_what_the_platform_allows_needs_no_author_check(case):
    """A node selector, toleration, GPU resource or grace period within the platform's policy is fine for
    anyone, with or without the admission policy."""
    assert violations(ALLOWED[case], author_checked=False) == []


def test_defaults_allow_the_default_gpu_and_an_hour_of_grace_and_nothing_else():
    """With the defaults: the default GPU resource name and up to an hour of grace, no node selector, no
    toleration, no affinity."""
    defaults = policy.Settings(image_prefixes=(TRAINER,))
    assert defaults.scheduling == policy.Scheduling(gpu_resource_names=("nvidia.com/gpu",),
                                                    max_grace_seconds=3600)
    ok = {"resources": {"gpusPerWorker": 1}, "runPolicy": {"terminationGracePeriodSeconds": 3600}}
    assert violations(ok, False, defaults) == []
    for changes, message in (({"resources": {"nodeSelector": {"kubetune.io/pool": "training"}}}, policy.NODE_SELECTOR),
                             ({"resources": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                              "effect": "NoSchedule"}]}}, policy.TOLERATION),
                             ({"runPolicy": {"terminationGracePeriodSeconds": 3601}}, policy.GRACE)):
        assert violations(changes, False, defaults) == [message + policy.UNCHECKED]


def test_decide_refuses_before_any_child():
    """The operator fails the job PolicyDenied before it creates anything: no validation pod, no training pod."""
    job = body(spec(resources={"tolerations": [{"operator": "Exists"}]}))
    assert policy.needs_admission_check(job, SETTINGS)
    d = decide(job, Observed(), NOW, operator())
    assert (d.phase, d.status["reason"], d.create) == ("Failed", "PolicyDenied", [])
    assert d.status["message"] == policy.TOLERATION + policy.UNCHECKED
    checked = Observed(admission_policy="2026-11-30T00:00:00Z")  # the API server judged the author
    assert decide(job, checked, NOW, operator()).phase == "Pending"
    assert not policy.needs_admission_check(body(spec(**ALLOWED["allowed tolerations"])), SETTINGS)


def validated(spec_: dict) -> dict:
    return body(spec_, {"phase": "Pending", "conditions": [
        {"type": "Validated", "status": "True", "reason": "DatasetValid",
         "lastTransitionTime": "2026-12-01T00:01:00Z"}]})


def test_raising_the_grace_period_after_creation_is_refused_without_the_policy():
    """runPolicy stays mutable, so the tenant creates the job with the default grace period and raises it to a
    day once the data is validated, before the training Job exists. Without the admission policy the operator
    fails the job PolicyDenied instead of creating the training Job."""
    job = validated(spec(runPolicy={"terminationGracePeriodSeconds": 86400}))
    assert policy.needs_admission_check(job, SETTINGS)
    d = decide(job, Observed(), NOW, operator())
    assert (d.phase, d.status["reason"]) == ("Failed", "PolicyDenied")
    assert d.status["message"] == policy.GRACE + policy.UNCHECKED
    assert not [o for o in d.create if o["kind"] == "Job"]
    # where the API server judges every raise (the policy was in force since before the job), it trains
    checked = decide(job, Observed(admission_policy="2026-11-30T00:00:00Z"), NOW, operator())
    (train,) = [o for o in checked.create if o["kind"] == "Job"]
    assert train["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 86400
    # within the maximum: no check needed
    assert not policy.needs_admission_check(validated(spec(runPolicy={"terminationGracePeriodSeconds": 600})),
                                            SETTINGS)


def test_a_platform_that_requires_kueue_refuses_a_job_without_a_queue():
    """With policy.requireQueue, the tenant leaves out scheduling.queueName to bypass Kueue's quotas: the job is
    refused whoever its author is (the admission policy, and the operator before any child)."""
    assert violations({}, author_checked=True, settings=QUEUED) == [policy.QUEUE]
    assert violations({}, author_checked=False, settings=QUEUED) == [policy.QUEUE]
    assert violations({"scheduling": {"queueName": "team-a"}}, author_checked=False, settings=QUEUED) == []
    assert violations({}, author_checked=False) == []  # off by default
    d = decide(body(spec()), Observed(), NOW, operator(QUEUED))
    assert (d.phase, d.status["reason"], d.status["message"], d.create) == ("Failed", "PolicyDenied", policy.QUEUE,
                                                                            [])


def test_the_operator_reads_the_scheduling_policy_from_its_environment():
    settings = OperatorSettings.from_env({
        "KUBETUNE_POLICY_NODE_SELECTORS": "kubetune.io/pool=training, topology.kubernetes.io/zone",
        "KUBETUNE_POLICY_TOLERATIONS": "nvidia.com/gpu:NoSchedule",
        "KUBETUNE_POLICY_GPU_RESOURCE_NAMES": "nvidia.com/gpu,amd.com/gpu",
        "KUBETUNE_POLICY_MAX_GRACE_SECONDS": "900", "KUBETUNE_POLICY_REQUIRE_QUEUE": "true"}).policy
    assert settings.scheduling == policy.Scheduling(
        node_selectors=("kubetune.io/pool=training", "topology.kubernetes.io/zone"),
        tolerations=("nvidia.com/gpu:NoSchedule",), gpu_resource_names=("nvidia.com/gpu", "amd.com/gpu"),
        max_grace_seconds=900, require_queue=True)
    assert OperatorSettings.from_env({}).policy.scheduling == policy.Scheduling()
    # set but empty: no GPU resource name is allowed without pod-create rights
    none = OperatorSettings.from_env({"KUBETUNE_POLICY_GPU_RESOURCE_NAMES": ""}).policy.scheduling
    assert none.gpu_resource_names == ()
    assert {k: v for k, v in settings.params().items() if k in policy.Scheduling().params()} == {
        "nodeSelectors": "kubetune.io/pool=training,topology.kubernetes.io/zone",
        "tolerations": "nvidia.com/gpu:NoSchedule", "gpuResourceNames": "nvidia.com/gpu,amd.com/gpu",
        "maxTerminationGracePeriodSeconds": "900", "requireQueue": "true"}


# -- the real API server: the admission policy judges the user who creates (or raises) ----------------------------

NAME = f"{policy.POLICY}-sched-{uuid.uuid4().hex[:6]}"  # of the policy and its bindings: the control plane is shared
LABEL = "kubetune.io/scheduling-test"
AUTHORS = ("alice", "bob")  # alice may create FineTuneJobs only; bob may also create pods (the `edit` role)


@pytest.fixture(scope="module")
def tenants(control_plane, crd):
    """Namespace `open` (the policy's parameters SETTINGS) and `queued` (requireQueue), where alice and bob may
    create and patch FineTuneJobs, and bob may also create pods."""
    names = {k: f"sched-{k}-{uuid.uuid4().hex[:6]}" for k in ("open", "queued")}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "ftj-author"},
            "rules": [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"],
                       "verbs": ["create", "get", "patch", "update"]}]}
    for key, ns in names.items():
        kubectl(control_plane, "create", "namespace", ns)
        kubectl(control_plane, "label", "namespace", ns, f"{LABEL}={key}")
        kubectl(control_plane, "apply", "-n", ns, "-f", "-", stdin=json.dumps(role))
        for user in AUTHORS:
            kubectl(control_plane, "create", "rolebinding", f"ftj-{user}", "-n", ns, "--role=ftj-author",
                    f"--user={user}")
        kubectl(control_plane, "create", "rolebinding", "bob-edit", "-n", ns, "--clusterrole=edit", "--user=bob")
    yield names
    for ns in names.values():
        kubectl(control_plane, "delete", "namespace", ns, "--wait=false")


@pytest.fixture(scope="module")
def admission(control_plane, tenants):
    """crds/policy/admission-policy.yaml under its own name, with two bindings: one per tenant namespace, each
    with its parameters ConfigMap; removed afterwards."""
    vap, binding, params = yaml.safe_load_all((ROOT / "crds" / "policy" / "admission-policy.yaml").read_text())
    ns = f"kubetune-system-{uuid.uuid4().hex[:6]}"
    kubectl(control_plane, "create", "namespace", ns)
    vap["metadata"]["name"] = NAME
    kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps(vap))
    bindings = []
    for key, settings in (("open", SETTINGS), ("queued", QUEUED)):
        cm = {**params, "metadata": {**params["metadata"], "name": f"params-{key}", "namespace": ns},
              "data": settings.params()}
        bind = {**binding, "metadata": {**binding["metadata"], "name": f"{NAME}-{key}"},
                "spec": {**binding["spec"], "policyName": NAME,
                         "paramRef": {**binding["spec"]["paramRef"], "name": f"params-{key}", "namespace": ns},
                         "matchResources": {"namespaceSelector": {"matchLabels": {LABEL: key}}}}}
        for doc in (cm, bind):
            kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps(doc))
        bindings.append(bind["metadata"]["name"])

    def enforced() -> bool:  # the API server's policy informers take a moment
        opened = create(control_plane, tenants["open"], "probe", spec(**ATTACKS["a toleration of every taint"][0]))
        queued = create(control_plane, tenants["queued"], "probe", spec())
        return policy.TOLERATION in _flat(opened.stderr) and policy.QUEUE in _flat(queued.stderr)

    wait_for("the admission policy to be enforced", enforced, timeout=60)
    yield
    for name in bindings:
        kubectl(control_plane, "delete", "validatingadmissionpolicybinding", name, "--wait=false")
    kubectl(control_plane, "delete", "validatingadmissionpolicy", NAME, "--wait=false")
    kubectl(control_plane, "delete", "namespace", ns, "--wait=false")


def _flat(text: str) -> str:
    return " ".join(text.split())


def create(cp, namespace: str, name: str, spec_: dict, user: str = "alice", dry_run: bool = True):
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec_}
    return kubectl(cp, "create", "-n", namespace, "--as", user, *(["--dry-run=server"] if dry_run else []),
                   "-f", "-", stdin=json.dumps(doc), check=False)


def patch(cp, namespace: str, name: str, run_policy: dict, user: str):
    return kubectl(cp, "patch", "ftj", name, "-n", namespace, "--as", user, "--type=merge",
                   "-p", json.dumps({"spec": {"runPolicy": run_policy}}), check=False)


@pytest.mark.cluster
def test_a_tenant_who_may_not_create_pods_is_refused_each_attack(control_plane, tenants, admission):
    """alice, who may create FineTuneJobs but not pods, tries each attack: the API server refuses each with the
    rule's message, and no FineTuneJob is created."""
    wrong = {}
    for attack, (changes, message) in ATTACKS.items():
        out = create(control_plane, tenants["open"], "attack", spec(**changes))
        if out.returncode == 0 or message not in _flat(out.stderr):
            wrong[attack] = out.stderr or out.stdout
    assert not wrong


@pytest.mark.cluster
def test_what_the_platform_allows_is_accepted_from_the_tenant(control_plane, tenants, admission):
    """alice sets node selectors, tolerations, a GPU resource and a grace period within the platform's policy:
    accepted."""
    refused = {case: out.stderr for case, changes in ALLOWED.items()
               if (out := create(control_plane, tenants["open"], "allowed", spec(**changes))).returncode != 0}
    assert not refused


@pytest.mark.cluster
def test_an_author_who_may_create_pods_may_set_any_of_them(control_plane, tenants, admission):
    """bob may create pods in the namespace, so he could create such pods himself: each attack's fields are
    accepted from him."""
    refused = {attack: out.stderr for attack, (changes, _) in ATTACKS.items()
               if (out := create(control_plane, tenants["open"], "bob", spec(**changes), user="bob")).returncode}
    assert not refused


@pytest.mark.cluster
def test_raising_the_grace_period_later_is_judged_like_a_create(control_plane, tenants, admission):
    """alice creates a job with the default grace period, then patches it to a day: refused with the rule's
    message. Raising it within the maximum, lowering it, or changing other runPolicy fields is accepted; bob, who
    may create pods, may raise it to a day."""
    ns = tenants["open"]
    for user in AUTHORS:
        out = create(control_plane, ns, f"grace-{user}", spec(), user=user, dry_run=False)
        assert out.returncode == 0, out.stderr
    out = patch(control_plane, ns, "grace-alice", {"terminationGracePeriodSeconds": 86400}, "alice")
    assert out.returncode != 0 and policy.GRACE in _flat(out.stderr), out.stderr
    for change in ({"terminationGracePeriodSeconds": 3600}, {"terminationGracePeriodSeconds": 60},
                   {"suspend": True}):
        out = patch(control_plane, ns, "grace-alice", change, "alice")
        assert out.returncode == 0, (change, out.stderr)
    assert patch(control_plane, ns, "grace-bob", {"terminationGracePeriodSeconds": 86400}, "bob").returncode == 0
    graces = {user: get_json(control_plane, "ftj", "-n", ns, f"grace-{user}")["spec"]["runPolicy"]
              ["terminationGracePeriodSeconds"] for user in AUTHORS}
    assert graces == {"alice": 60, "bob": 86400}


@pytest.mark.cluster
def test_without_a_queue_name_a_job_is_refused_where_the_platform_requires_kueue(control_plane, tenants, admission):
    """In a namespace whose policy sets requireQueue, alice and bob leave out scheduling.queueName: both are
    refused, with a message that says to name a LocalQueue. With a queue name, accepted."""
    ns = tenants["queued"]
    for user in AUTHORS:
        out = create(control_plane, ns, "unqueued", spec(), user=user)
        assert out.returncode != 0 and policy.QUEUE in _flat(out.stderr), out.stderr
        out = create(control_plane, ns, "queued", spec(scheduling={"queueName": "team-a"}), user=user)
        assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def unchecked_operator(control_plane, crd, tmp_path_factory):
    """The operator on a cluster without the admission policy (no KUBETUNE_POLICY_BINDING), requiring Kueue."""
    env = e2e.operator_env(control_plane, KUBETUNE_POLICY_REQUIRE_QUEUE="true")
    yield from e2e.run_operator(tmp_path_factory, env)


@pytest.mark.cluster
@pytest.mark.e2e
def test_without_the_policy_the_operator_refuses_before_any_child(control_plane, namespace, unchecked_operator):
    """On a cluster without the admission policy, a job that tolerates every taint, and one without a queue where
    the platform requires Kueue, end Failed (PolicyDenied) with the rule's message; no Job or ConfigMap exists."""
    queued = {"queueName": "team-a"}
    e2e.submit(control_plane, namespace, "tolerate-all",
               spec(resources={"tolerations": [{"operator": "Exists"}]}, scheduling=queued))
    e2e.submit(control_plane, namespace, "no-queue", spec())
    expected = {"tolerate-all": policy.TOLERATION + policy.UNCHECKED, "no-queue": policy.QUEUE}
    for name, message in expected.items():
        status = e2e.wait_phase(control_plane, namespace, name, ("Failed", "Pending", "Running"), timeout=60)["status"]
        assert (status["phase"], status["reason"], status["message"]) == ("Failed", "PolicyDenied", message)
    assert get_json(control_plane, "jobs,configmaps", "-n", namespace, "-l", "kubetune.io/finetunejob")["items"] == []
