"""Storage access follows the author (issue 27, item 1): what a tenant who may create FineTuneJobs tries, to reach
storage or credentials they could not reach themselves, and what the system answers.

Each test's docstring names the attack and the answer. The cluster tests run against the real API server with the
admission policy of crds/policy/admission-policy.yaml, and with the operator as `python -m kubetune_operator`; the
tenant is `mallory` (`kubectl --as`), who may create FineTuneJobs in her namespace and nothing else unless a test
grants it. The unit tests check the operator's own enforcement (policy.violations), for clusters without the policy.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml
from kubetune_api import FineTuneJobSpec
from kubetune_operator import policy

from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e

pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

ROOT = Path(__file__).resolve().parents[2]
crd = e2e.crd  # the fixture that applies the CRD
TENANT = "mallory"
TRAINER = "ghcr.io/kubetune/trainer"
PLATFORM_SECRET = "s3-credentials"  # the chart's storage.secretName


def spec(**extra) -> dict:
    return {"baseModel": {"uri": "s3://models/tiny/"}, "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/run/"}, **extra}


def settings(**extra) -> policy.Settings:
    return policy.Settings(image_prefixes=(TRAINER,), credentials_secret=PLATFORM_SECRET, **extra)


def violations(namespace: str, job: dict, platform: policy.Settings, author_checked: bool) -> list[str]:
    return policy.violations(namespace, FineTuneJobSpec.model_validate(job), platform, author_checked)


# -- the real API server: fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tenant_ns(control_plane, crd):
    """mallory's namespace: she may create FineTuneJobs there, nothing else. It holds the Secrets `team-s3` (her
    team's) and `finance-s3` (another team's keys, kept in the same namespace), and the platform's Secret."""
    ns = f"tenant-{uuid.uuid4().hex[:6]}"
    kubectl(control_plane, "create", "namespace", ns)
    kubectl(control_plane, "label", "namespace", ns, "kubetune.io/storage-access-test=true")
    kubectl(control_plane, "create", "role", "ftj-author", "-n", ns, "--verb=create",
            "--resource=finetunejobs.kubetune.io")
    kubectl(control_plane, "create", "rolebinding", "ftj-author", "-n", ns, "--role=ftj-author",
            f"--user={TENANT}")
    for secret in ("team-s3", "finance-s3", PLATFORM_SECRET):
        kubectl(control_plane, "create", "secret", "generic", secret, "-n", ns,
                "--from-literal=AWS_ACCESS_KEY_ID=x", "--from-literal=AWS_SECRET_ACCESS_KEY=y")
    yield ns
    kubectl(control_plane, "delete", "namespace", ns, "--wait=false")


def install_policy(cp, platform: policy.Settings, name: str) -> callable:
    """crds/policy/admission-policy.yaml under `name`, its params from `platform`, bound to the namespaces of
    this module; returns the function that removes it all."""
    vap, binding, params = yaml.safe_load_all((ROOT / "crds" / "policy" / "admission-policy.yaml").read_text())
    ns = f"kubetune-system-{uuid.uuid4().hex[:6]}"
    kubectl(cp, "create", "namespace", ns)
    params["metadata"]["namespace"] = binding["spec"]["paramRef"]["namespace"] = ns
    vap["metadata"]["name"] = binding["metadata"]["name"] = binding["spec"]["policyName"] = name
    params["data"] = platform.params()
    binding["spec"]["matchResources"] = {
        "namespaceSelector": {"matchLabels": {"kubetune.io/storage-access-test": "true"}}}
    for doc in (vap, params, binding):
        kubectl(cp, "apply", "-f", "-", stdin=json.dumps(doc))

    def remove() -> None:
        for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
            kubectl(cp, "delete", kind, name, "--wait=false")
        kubectl(cp, "delete", "namespace", ns, "--wait=false")

    return remove


PLATFORM = settings(credentials_namespaces=("*",))


@pytest.fixture(scope="module")
def admission(control_plane, tenant_ns):
    """The admission policy with PLATFORM's parameters, enforced for tenant_ns."""
    remove = install_policy(control_plane, PLATFORM, f"{policy.POLICY}-{uuid.uuid4().hex[:6]}")

    def enforced() -> bool:  # the API server's policy informers take a moment
        out = create(control_plane, tenant_ns, spec(image="docker.io/x/miner:1"))
        return out.returncode != 0 and policy.IMAGE in out.stderr

    wait_for("the admission policy to be enforced", enforced, timeout=60)
    yield
    remove()


def create(cp, namespace: str, spec_: dict, user: str = TENANT, dry_run: bool = True):
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": f"job-{uuid.uuid4().hex[:6]}"}, "spec": spec_}
    return kubectl(cp, "create", "-n", namespace, "--as", user, *(["--dry-run=server"] if dry_run else []),
                   "-f", "-", stdin=json.dumps(doc), check=False)


def refused_with(out, message: str) -> bool:
    return out.returncode != 0 and message in " ".join(out.stderr.split())


def grant_get_secret(cp, namespace: str, secret: str) -> None:
    kubectl(cp, "create", "role", f"read-{secret}", "-n", namespace, "--verb=get", "--resource=secrets",
            f"--resource-name={secret}")
    kubectl(cp, "create", "rolebinding", f"read-{secret}", "-n", namespace, f"--role=read-{secret}",
            f"--user={TENANT}")


# -- 1. a Secret other than the platform's needs the author's `get` on it -----------------------------------------

def test_the_operator_refuses_a_secret_it_cannot_check_the_author_for():
    """Attack: on a cluster without the admission policy, mallory names another team's Secret in
    storage.secretRef; the pods would get its keys as env vars. Answer: the operator cannot know who created the
    job, so it fails any job naming a Secret other than the platform's default (PolicyDenied, before any child),
    saying to install the policy. With the policy in force (author checked) the API server has judged it."""
    own = spec(storage={"secretRef": {"name": "finance-s3"}})
    assert violations("t", own, PLATFORM, author_checked=False) == [policy.SECRET + policy.UNCHECKED]
    assert violations("t", own, PLATFORM, author_checked=True) == []
    default = spec(storage={"secretRef": {"name": PLATFORM_SECRET}})  # the platform's: its own rule
    assert violations("t", default, PLATFORM, author_checked=False) == []
    assert violations("t", spec(storage={}), PLATFORM, author_checked=False) == []


@pytest.mark.cluster
def test_naming_a_secret_needs_get_on_it(control_plane, tenant_ns, admission):
    """Attack: mallory, who may create FineTuneJobs but not read Secrets, names `finance-s3` (or her own team's
    `team-s3`, before she is granted it) in storage.secretRef. Answer: the API server refuses the job with the
    rule's message. Granted `get` on exactly team-s3, she may name team-s3, still not finance-s3; the platform's
    default Secret needs no grant (policy.defaultCredentialsNamespaces decides); a user with `get` on every
    Secret (the `edit` role) may name any."""
    ns = tenant_ns
    for secret in ("finance-s3", "team-s3"):
        out = create(control_plane, ns, spec(storage={"secretRef": {"name": secret}}))
        assert refused_with(out, policy.SECRET), (secret, out.stderr)
    grant_get_secret(control_plane, ns, "team-s3")
    ok = wait_for("mallory's grant to reach the authorizer", lambda: create(
        control_plane, ns, spec(storage={"secretRef": {"name": "team-s3"}})).returncode == 0, timeout=30)
    assert ok
    assert refused_with(create(control_plane, ns, spec(storage={"secretRef": {"name": "finance-s3"}})),
                        policy.SECRET)
    for storage in ({"secretRef": {"name": PLATFORM_SECRET}}, {}):
        out = create(control_plane, ns, spec(storage=storage))
        assert out.returncode == 0, out.stderr
    kubectl(control_plane, "create", "rolebinding", "bob-edit", "-n", ns, "--clusterrole=edit", "--user=bob")
    kubectl(control_plane, "create", "rolebinding", "bob-ftj", "-n", ns, "--role=ftj-author", "--user=bob")
    out = create(control_plane, ns, spec(storage={"secretRef": {"name": "finance-s3"}}), user="bob")
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def unchecked_operator(control_plane, crd, tmp_path_factory):
    """The operator told of no admission policy: it enforces the rules itself."""
    env = e2e.operator_env(control_plane, KUBETUNE_STORAGE_SECRET_NAME=PLATFORM_SECRET,
                           KUBETUNE_POLICY_CREDENTIALS_NAMESPACES="*")
    yield from e2e.run_operator(tmp_path_factory, env)


@pytest.mark.cluster
@pytest.mark.e2e
def test_without_the_policy_the_operator_refuses_a_secret_of_the_namespace(control_plane, unchecked_operator):
    """Attack: on a cluster without the admission policy, a tenant creates a job naming another team's Secret.
    Answer: the job fails PolicyDenied with the rule's message and the note to install the policy; no Job,
    ConfigMap or pod exists, so the Secret's keys reach no pod."""
    ns = f"unchecked-{uuid.uuid4().hex[:6]}"
    kubectl(control_plane, "create", "namespace", ns)
    try:
        e2e.submit(control_plane, ns, "other-secret", spec(storage={"secretRef": {"name": "finance-s3"}}))
        status = e2e.wait_phase(control_plane, ns, "other-secret", ("Failed", "Pending", "Validating"),
                                timeout=60)["status"]
        assert (status["phase"], status["reason"]) == ("Failed", "PolicyDenied"), status
        assert status["message"] == policy.SECRET + policy.UNCHECKED
        children = get_json(control_plane, "jobs,configmaps,pods", "-n", ns, "-l",
                            "kubetune.io/finetunejob=other-secret")
        assert children["items"] == []
    finally:
        kubectl(control_plane, "delete", "namespace", ns, "--wait=false")
