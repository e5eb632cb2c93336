"""Storage access follows the author (issue 27, item 1): what a tenant who may create FineTuneJobs tries, to reach
storage or credentials they could not reach themselves, and what the system answers.

1. A Secret other than the platform's default needs the author's `get` on it.
2. Every storage URI of the spec, and every s3:// image reference in the data, is under the namespace's prefixes
   (policy.allowedStoragePrefixes).
3. The platform's default credentials go to the platform's endpoint only; other endpoints must be on
   policy.allowedStorageEndpoints.
4. A storage error in the status names the operation and the bucket, never the endpoint's reply.

Each test's docstring names the attack and the answer. The cluster tests run against the real API server with the
admission policy of crds/policy/admission-policy.yaml, and with the operator as `python -m kubetune_operator`; the
tenant is `mallory` (`kubectl --as`), who may create FineTuneJobs in her namespace and nothing else unless a test
grants it. The unit tests check the operator's own enforcement (policy.violations, children), for clusters without
the policy, and the trainer's (a local S3 endpoint that answers with hostile text; image references in data files).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from kubetune_api import FineTuneJobSpec
from kubetune_operator import children, policy
from kubetune_operator.settings import OperatorSettings

from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e

pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

ROOT = Path(__file__).resolve().parents[2]
crd = e2e.crd  # the fixture that applies the CRD
TENANT = "mallory"
TRAINER = "ghcr.io/kubetune/trainer"
PLATFORM_SECRET = "s3-credentials"  # the chart's storage.secretName


def spec(ns: str = "t", **extra) -> dict:
    """A job of namespace `ns` whose data is in its bucket (PLATFORM's allowed prefix)."""
    return {"baseModel": {"uri": f"s3://ml-{ns}/models/tiny/"}, "dataset": {"train": f"s3://ml-{ns}/data/train.jsonl"},
            "output": {"uri": f"s3://ml-{ns}/out/run/"}, **extra}


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


def install_policy(cp, platform: policy.Settings, name: str,
                   label: str = "kubetune.io/storage-access-test") -> Callable[[], None]:
    """crds/policy/admission-policy.yaml under `name`, its params from `platform`, bound to the namespaces
    labelled `label`=true (this module's); returns the function that removes it all."""
    vap, binding, params = yaml.safe_load_all((ROOT / "crds" / "policy" / "admission-policy.yaml").read_text())
    ns = f"kubetune-system-{uuid.uuid4().hex[:6]}"
    kubectl(cp, "create", "namespace", ns)
    params["metadata"]["namespace"] = binding["spec"]["paramRef"]["namespace"] = ns
    vap["metadata"]["name"] = binding["metadata"]["name"] = binding["spec"]["policyName"] = name
    params["data"] = platform.params()
    binding["spec"]["matchResources"] = {
        "namespaceSelector": {"matchLabels": {label: "true"}}}
    for doc in (vap, params, binding):
        kubectl(cp, "apply", "-f", "-", stdin=json.dumps(doc))

    def remove() -> None:
        for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
            kubectl(cp, "delete", kind, name, "--wait=false")
        kubectl(cp, "delete", "namespace", ns, "--wait=false")

    return remove


PLATFORM_ENDPOINT = "http://s3.platform.local:9000"  # the chart's storage.endpoint
PARTNER_ENDPOINT = "https://s3.partner.example.com"  # policy.allowedStorageEndpoints
ATTACKER_ENDPOINT = "https://s3.attacker.example"
PLATFORM = settings(credentials_namespaces=("*",), storage_prefixes=("s3://ml-{namespace}/",),
                    storage_endpoint=PLATFORM_ENDPOINT, storage_endpoints=(PARTNER_ENDPOINT,))


@pytest.fixture(scope="module")
def admission(control_plane, tenant_ns):
    """The admission policy with PLATFORM's parameters, enforced for tenant_ns."""
    remove = install_policy(control_plane, PLATFORM, f"{policy.POLICY}-{uuid.uuid4().hex[:6]}")

    def enforced() -> bool:  # the API server's policy informers take a moment
        out = create(control_plane, tenant_ns, spec(tenant_ns, image="docker.io/x/miner:1"))
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


MLFLOW = "http://mlflow.mlflow:5000"


def tracking(secret: str) -> dict:
    return {"tracking": {"mlflow": {"uri": MLFLOW, "secretRef": {"name": secret}}}}


def test_the_operator_refuses_a_tracking_secret_it_cannot_check_the_author_for():
    """Attack: on a cluster without the admission policy, mallory names another team's Secret (or the platform's
    storage credentials) in tracking.mlflow.secretRef; rank 0 would get its MLFLOW_* keys and send them to the
    tracking server she names. Answer: the same rule as storage.secretRef, with no exemption for the platform's
    Secret: without the policy the job fails PolicyDenied; with it, the API server has judged the author."""
    for secret in ("finance-mlflow", PLATFORM_SECRET):
        job = spec(**tracking(secret))
        assert violations("t", job, PLATFORM, author_checked=False) == [policy.SECRET + policy.UNCHECKED], secret
        assert violations("t", job, PLATFORM, author_checked=True) == []
        assert policy.needs_admission_check({"spec": job}, PLATFORM)
    both = spec(storage={"secretRef": {"name": "team-s3"}}, **tracking("finance-mlflow"))
    assert policy.own_secrets(FineTuneJobSpec.model_validate(both), PLATFORM) == ["team-s3", "finance-mlflow"]
    assert violations("t", spec(tracking={"mlflow": {"uri": MLFLOW}}), PLATFORM, author_checked=False) == []


@pytest.mark.cluster
def test_naming_a_tracking_secret_needs_get_on_it(control_plane, tenant_ns, admission):
    """Attack: mallory names `finance-s3` (or the platform's storage Secret) as her MLflow credentials. Answer:
    the API server refuses it with the Secret rule's message; granted `get` on exactly team-mlflow, she may name
    it, still not finance-s3 beside it."""
    ns = tenant_ns
    for secret in ("finance-s3", PLATFORM_SECRET, "team-mlflow"):
        out = create(control_plane, ns, spec(ns, **tracking(secret)))
        assert refused_with(out, policy.SECRET), (secret, out.stderr)
    grant_get_secret(control_plane, ns, "team-mlflow")
    assert wait_for("mallory's grant to reach the authorizer", lambda: create(
        control_plane, ns, spec(ns, **tracking("team-mlflow"))).returncode == 0, timeout=30)
    out = create(control_plane, ns, spec(ns, storage={"secretRef": {"name": "team-mlflow"}}, **tracking("finance-s3")))
    assert refused_with(out, policy.SECRET), out.stderr


@pytest.mark.cluster
def test_naming_a_secret_needs_get_on_it(control_plane, tenant_ns, admission):
    """Attack: mallory, who may create FineTuneJobs but not read Secrets, names `finance-s3` (or her own team's
    `team-s3`, before she is granted it) in storage.secretRef. Answer: the API server refuses the job with the
    rule's message. Granted `get` on exactly team-s3, she may name team-s3, still not finance-s3; the platform's
    default Secret needs no grant (policy.defaultCredentialsNamespaces decides); a user with `get` on every
    Secret (the `edit` role) may name any."""
    ns = tenant_ns
    for secret in ("finance-s3", "team-s3"):
        out = create(control_plane, ns, spec(ns, storage={"secretRef": {"name": secret}}))
        assert refused_with(out, policy.SECRET), (secret, out.stderr)
    grant_get_secret(control_plane, ns, "team-s3")
    ok = wait_for("mallory's grant to reach the authorizer", lambda: create(
        control_plane, ns, spec(ns, storage={"secretRef": {"name": "team-s3"}})).returncode == 0, timeout=30)
    assert ok
    assert refused_with(create(control_plane, ns, spec(ns, storage={"secretRef": {"name": "finance-s3"}})),
                        policy.SECRET)
    for storage in ({"secretRef": {"name": PLATFORM_SECRET}}, {}):
        out = create(control_plane, ns, spec(ns, storage=storage))
        assert out.returncode == 0, out.stderr
    kubectl(control_plane, "create", "rolebinding", "bob-edit", "-n", ns, "--clusterrole=edit", "--user=bob")
    kubectl(control_plane, "create", "rolebinding", "bob-ftj", "-n", ns, "--role=ftj-author", "--user=bob")
    out = create(control_plane, ns, spec(ns, storage={"secretRef": {"name": "finance-s3"}}), user="bob")
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
        e2e.submit(control_plane, ns, "other-secret", spec(ns, storage={"secretRef": {"name": "finance-s3"}}))
        status = e2e.wait_phase(control_plane, ns, "other-secret", ("Failed", "Pending", "Validating"),
                                timeout=60)["status"]
        assert (status["phase"], status["reason"]) == ("Failed", "PolicyDenied"), status
        assert status["message"] == policy.SECRET + policy.UNCHECKED
        children = get_json(control_plane, "jobs,configmaps,pods", "-n", ns, "-l",
                            "kubetune.io/finetunejob=other-secret")
        assert children["items"] == []
    finally:
        kubectl(control_plane, "delete", "namespace", ns, "--wait=false")


# -- 2. every storage URI under the namespace's prefixes ---------------------------------------------------------

URI_FIELDS = {  # where a URI can be: the spec changes that put `uri` there
    "baseModel.uri": lambda uri: {"baseModel": {"uri": uri}},
    "dataset.train": lambda uri: {"dataset": {"train": uri}},
    "dataset.validation": lambda uri: {"dataset": {"train": "s3://ml-t/d/train.jsonl", "validation": uri}},
    "dataset.test": lambda uri: {"dataset": {"train": "s3://ml-t/d/train.jsonl", "test": uri}},
    "dataset.cacheUri": lambda uri: {"dataset": {"train": "s3://ml-t/d/train.jsonl", "cacheUri": uri}},
    "checkpoint.uri": lambda uri: {"checkpoint": {"uri": uri}},
    "output.uri": lambda uri: {"output": {"uri": uri}},
}


@pytest.mark.parametrize("field", URI_FIELDS)
def test_every_storage_uri_must_be_under_the_namespaces_prefixes(field):
    """Attack: mallory (namespace t) points one URI of her job at another team's bucket: reading their dataset
    or base model, or, with output.overwrite, moving their published adapter aside and publishing hers in its
    place. Answer: with policy.allowedStoragePrefixes `s3://ml-{namespace}/`, the job is refused (by the API
    server and, without the policy, by the operator) with a message naming the URI and the allowed prefixes;
    the same field under s3://ml-t/ is allowed, and with no prefixes configured any URI is (as before)."""
    other = "s3://ml-finance/" + ("data/x.jsonl" if field.startswith("dataset.") and field != "dataset.cacheUri"
                                  else "prefix/")
    job = spec(**URI_FIELDS[field](other))
    expected = policy.storage_prefix_message([other], ["s3://ml-t/"])
    assert violations("t", job, PLATFORM, author_checked=True) == [expected]
    assert other in expected and "s3://ml-t/" in expected and "policy.allowedStoragePrefixes" in expected
    assert violations("finance", job, PLATFORM, True) != [expected]  # {namespace} is the job's
    mine = other.replace("ml-finance", "ml-t")
    assert violations("t", spec(**URI_FIELDS[field](mine)), PLATFORM, author_checked=True) == []
    assert violations("t", job, settings(credentials_namespaces=("*",)), author_checked=True) == []


@pytest.mark.parametrize("uri", ["s3://ml-t/../ml-finance/out/", "s3://ml-t/./x/../../ml-finance/",
                                 "s3://ml-tx/out/", "s3://ml-t", "hf://org/model", "pvc://claim/out/",
                                 "S3://ml-t/out/"])
def test_a_uri_cannot_escape_its_prefix(uri):
    """Attack: a URI that starts like an allowed one but is not under it: `..` segments (S3 keeps them as they
    are, a path or proxy may resolve them), a bucket whose name only begins like the allowed one, another
    scheme. Answer: refused; hf:// and pvc:// need their own prefixes (`hf://`, `pvc://`)."""
    assert not policy.uri_allowed(uri, ["s3://ml-t/"])
    assert policy.uri_allowed("s3://ml-t/out/run-1/", ["s3://ml-t/"])
    assert policy.uri_allowed("hf://org/model", ["s3://ml-t/", "hf://"])


@pytest.mark.cluster
def test_the_api_server_refuses_uris_outside_the_prefixes(control_plane, tenant_ns, admission):
    """Attack: on the real API server, mallory sends jobs whose output, base model or data cache is in another
    team's bucket, or escapes her bucket with `..`. Answer: refused, with the same message as the operator's
    (naming the URIs and the allowed prefix for her namespace); her own bucket is accepted."""
    ns = tenant_ns
    assert create(control_plane, ns, spec(ns)).returncode == 0
    for field, uri in (("output.uri", "s3://ml-finance/adapters/"), ("baseModel.uri", "s3://ml-finance/models/"),
                       ("dataset.cacheUri", f"s3://ml-{ns}/../ml-finance/cache/")):
        job = spec(ns, **URI_FIELDS[field](uri))
        out = create(control_plane, ns, job)
        expected = policy.storage_prefix_message(
            [u for u in policy.storage_uris(FineTuneJobSpec.model_validate(job)) if not u.startswith(f"s3://ml-{ns}/")
             or ".." in u], [f"s3://ml-{ns}/"])
        assert refused_with(out, expected), (field, out.stderr)
        assert violations(ns, job, PLATFORM, author_checked=True) == [expected]


# -- 3. the platform's credentials go to the platform's endpoint only; endpoints on a list -----------------------

OPERATOR = OperatorSettings(storage_endpoint=PLATFORM_ENDPOINT, storage_secret_name=PLATFORM_SECRET, policy=PLATFORM)
META = {"name": "j", "namespace": "t", "uid": "u-1"}


def pod_env(job: dict) -> dict:
    """The env of the validation and training pods the operator would create for `job` (its storage defaults
    filled in as the operator does)."""
    parsed = FineTuneJobSpec.model_validate(children.with_storage_defaults(job, OPERATOR))
    out = {}
    for child in (children.validation_job(META, parsed, OPERATOR), children.training_job(META, parsed, OPERATOR)):
        (container,) = child["spec"]["template"]["spec"]["containers"]
        out[child["metadata"]["name"]] = {e["name"]: e.get("valueFrom", e.get("value")) for e in container["env"]}
    return out


def test_the_default_secret_is_never_filled_in_for_an_endpoint_of_the_jobs_own():
    """Attack: mallory sets storage.endpoint to her own server and names no credentials, expecting the platform's
    default Secret to be filled in: the pods would send its key id, and signatures made with its secret key, to
    her host. Answer: a job with an endpoint of its own gets no default credentials: no AWS_* variable in any
    pod. A job with no endpoint, or the platform's own (a trailing slash aside), still gets them."""
    for endpoint in (ATTACKER_ENDPOINT, PARTNER_ENDPOINT):
        job = spec(storage={"endpoint": endpoint})
        assert "secretRef" not in children.with_storage_defaults(job, OPERATOR)["storage"]
        for env in pod_env(job).values():
            assert not {k for k in env if k.startswith("AWS_")}, env
    for storage in ({}, {"endpoint": PLATFORM_ENDPOINT + "/"}):
        for env in pod_env(spec(storage=storage)).values():
            assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {
                "name": PLATFORM_SECRET, "key": "AWS_SECRET_ACCESS_KEY", "optional": False}}


def test_naming_the_default_secret_with_an_endpoint_of_ones_own_is_refused():
    """Attack: mallory names the platform's Secret explicitly, with her own storage.endpoint. Answer: refused
    (API server and operator alike) with a message saying the default credentials go only to the platform's
    endpoint. Had such a job been admitted before this rule, the operator would still attach no keys to its
    pods."""
    job = spec(storage={"endpoint": PARTNER_ENDPOINT, "secretRef": {"name": PLATFORM_SECRET}})
    assert violations("t", job, PLATFORM, author_checked=True) == [policy.DEFAULT_CREDENTIALS_ENDPOINT]
    parsed = FineTuneJobSpec.model_validate(job)
    for child in (children.validation_job(META, parsed, OPERATOR), children.training_job(META, parsed, OPERATOR)):
        (container,) = child["spec"]["template"]["spec"]["containers"]
        assert not [e for e in container["env"] if e["name"].startswith("AWS_")]
    own = spec(storage={"endpoint": PLATFORM_ENDPOINT, "secretRef": {"name": PLATFORM_SECRET}})
    assert violations("t", own, PLATFORM, author_checked=True) == []


def test_only_listed_endpoints_may_be_named():
    """Attack: mallory points her job at an endpoint the platform does not know (to exfiltrate the data her
    credentials can read, or to serve the pods a poisoned model). Answer: with policy.allowedStorageEndpoints
    set, an endpoint not on it (nor the platform's own) is refused naming storage.endpoint; without the list,
    any endpoint is allowed, as before (with no default credentials)."""
    for endpoint, allowed in ((ATTACKER_ENDPOINT, False), (PARTNER_ENDPOINT, True), (PARTNER_ENDPOINT + "/", True),
                              (PLATFORM_ENDPOINT, True), (PARTNER_ENDPOINT + ".attacker.example", False)):
        job = spec(storage={"endpoint": endpoint, "secretRef": {"name": "team-s3"}})
        assert (violations("t", job, PLATFORM, True) == [policy.ENDPOINT]) is not allowed, endpoint
    anywhere = settings(credentials_namespaces=("*",))
    assert violations("t", spec(storage={"endpoint": ATTACKER_ENDPOINT}), anywhere, True) == []


@pytest.mark.cluster
def test_the_api_server_keeps_the_default_credentials_on_the_platforms_endpoint(control_plane, tenant_ns, admission):
    """Attack: on the real API server, mallory names the platform's Secret with her own endpoint, or an endpoint
    not on the platform's list. Answer: refused with the operator's messages; the platform's Secret with no
    endpoint, a listed endpoint with no credentials, and the platform's endpoint are accepted."""
    ns = tenant_ns
    refused = {
        policy.DEFAULT_CREDENTIALS_ENDPOINT: {"endpoint": PARTNER_ENDPOINT, "secretRef": {"name": PLATFORM_SECRET}},
        policy.ENDPOINT: {"endpoint": ATTACKER_ENDPOINT},
    }
    for message, storage in refused.items():
        out = create(control_plane, ns, spec(ns, storage=storage))
        assert refused_with(out, message), (storage, out.stderr)
    for storage in ({"secretRef": {"name": PLATFORM_SECRET}}, {"endpoint": PARTNER_ENDPOINT},
                    {"endpoint": PLATFORM_ENDPOINT + "/", "secretRef": {"name": PLATFORM_SECRET}}):
        out = create(control_plane, ns, spec(ns, storage=storage))
        assert out.returncode == 0, (storage, out.stderr)


# -- 4. storage errors in the status: the operation and the bucket, never the endpoint's words -------------------

HOSTILE = "Your session expired: sign in again at https://login.attacker.example/?next=kubetune"


class HostileEndpoint:
    """An S3 endpoint (a tenant's, or one in the middle) that answers every request with `status` and an S3 error
    whose Code and Message it chooses: what it writes must not reach the FineTuneJob's status, where other users
    (and the platform's alerts) read it as Kubetune's word."""

    def __init__(self, status: int, code: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        body = f"<Error><Code>{code}</Code><Message>{HOSTILE}</Message></Error>".encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    def __enter__(self) -> str:
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(("status", "code", "kind"), [
    (403, "AccessDenied", "ConfigError"), (400, "InvalidRequest", "ConfigError"),
    (503, "SlowDown", "TransientError"), (500, f"Internal {HOSTILE}", "TransientError"),
    (403, "&lt;script&gt;alert(1)&lt;/script&gt;", "ConfigError"),  # the Code's text: <script>...
])
def test_storage_errors_name_the_operation_and_the_bucket_not_the_endpoints_reply(monkeypatch, tmp_path, status,
                                                                                   code, kind):
    """Attack: an endpoint answers the trainer's requests with an error whose text it chooses (a phishing link, a
    fake instruction, markup), hoping the trainer copies it into the job's status, the kubectl output and the
    Events. Answer: the error the trainer ends with (its termination message, which the operator copies into the
    status) names the operation, the URI with its bucket and the HTTP status, with the S3 error code only when it
    is a plain code word; the reply's message never appears, nor a code with other characters."""
    from kubetune_trainer.errors import KubetuneError
    from kubetune_trainer.storage import Storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-example")
    with HostileEndpoint(status, code) as endpoint:
        storage = Storage(FineTuneJobSpec.model_fields["storage"].annotation(endpoint=endpoint), max_attempts=1)
        storage.retry_backoff = 0
        source = tmp_path / "x.bin"
        source.write_bytes(b"x")
        for action, call in (("download", lambda: storage.download("s3://team-bucket/data/x.bin", tmp_path / "o")),
                             ("upload", lambda: storage.upload_file(source, "s3://team-bucket/out/x.bin"))):
            with pytest.raises(KubetuneError) as err:
                call()
            message = err.value.message
            assert type(err.value).__name__ == kind, message
            assert message.startswith(f"{action} s3://team-bucket/"), message
            assert "s3://team-bucket/" in message and f"HTTP {status}" in message, message
            assert "attacker" not in message and "<" not in message and "sign in" not in message, message
            if action == "upload" and code.isalnum():  # a download's HEAD reply has no body: no code
                assert code in message, message


def test_an_unmapped_storage_error_keeps_the_reply_out_of_the_termination_message(monkeypatch, tmp_path):
    """Attack: the same hostile reply, reaching the trainer through a call that no Storage method wraps (an
    error that escapes to the command's last resort). Answer: the termination message (the status) says the
    storage operation failed, with the HTTP status and code, never the reply's message."""
    import typer
    from botocore.exceptions import ClientError
    from kubetune_trainer import cli

    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    error = ClientError({"Error": {"Code": "InternalError", "Message": HOSTILE},
                         "ResponseMetadata": {"HTTPStatusCode": 500}}, "PutObject")
    with pytest.raises(typer.Exit):
        cli.fail(error)
    assert log.read_text() == "Unexpected: object storage failed in PutObject (HTTP 500 InternalError)"


# -- 2, in the data: the trainer's s3:// image references -------------------------------------------------------

def test_the_operator_tells_the_trainer_its_prefixes():
    """The trainer config the operator writes holds the namespace's allowed prefixes, for the data files'
    image references (the spec's own URIs were checked at admission); with none configured, it holds none."""
    parsed = FineTuneJobSpec.model_validate(spec())
    config = yaml.safe_load(children.config_map(META, parsed, OPERATOR)["data"]["trainer.yaml"])
    assert config["storagePrefixes"] == ["s3://ml-t/"]
    anywhere = OperatorSettings(policy=settings(credentials_namespaces=("*",)))
    assert "storagePrefixes" not in yaml.safe_load(children.config_map(META, parsed, anywhere)["data"]["trainer.yaml"])


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from tests.trainer.test_image_classification import make_tiny_vit

    return make_tiny_vit(tmp_path_factory.mktemp("vit"), image_size=32, patch_size=8, hidden_size=32, layers=2,
                         heads=2)


@pytest.mark.parametrize("reference", ["s3://ml-finance/private/1.png", "s3://ml-t/../ml-finance/private/1.png",
                                       "s3://ml-tx/1.png"])
def test_an_image_reference_outside_the_prefixes_is_refused_naming_the_line(tmp_path, vit, reference):
    """Attack: mallory's data file (under her prefix, so admitted) names, on line 2, an image in another team's
    bucket by an s3:// URI, hoping the validation and training pods fetch it with whatever credentials they
    hold. Answer: validation fails DatasetInvalid naming the file, the line, the URI and the allowed prefixes,
    before anything is downloaded."""
    from kubetune_trainer.errors import DatasetError

    from tests.trainer.test_image_classification import LABELS, make_config, validated, write_split

    folder = tmp_path / "data"
    train = write_split(folder, "train", LABELS, **{"1": {"image": reference, "label": "dark"}})
    config = make_config(tmp_path, vit, str(train), storagePrefixes=["s3://ml-t/"])
    with pytest.raises(DatasetError) as err:
        validated(config)
    assert f"train.jsonl:2: image {reference!r} is outside the storage prefixes" in str(err.value)
    assert "policy.allowedStoragePrefixes: s3://ml-t/" in str(err.value)


def test_an_image_reference_under_the_prefixes_is_located(tmp_path):
    """The same reference under the allowed prefix (or with no prefixes) is an image to fetch, as before."""
    from kubetune_trainer.images import ImageStore

    for prefixes in (("s3://ml-t/",), ()):
        store = ImageStore(None, tmp_path / "cache", tmp_path / "train.jsonl", "s3://ml-t/data/train.jsonl", prefixes)
        assert store.locate("s3://ml-t/images/1.png", "s3://ml-t/data/train.jsonl").uri == "s3://ml-t/images/1.png"
        assert store.locate("../images/2.png", "s3://ml-t/data/train.jsonl").uri == "s3://ml-t/images/2.png"
