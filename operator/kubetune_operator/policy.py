"""What a FineTuneJob may ask for: one list of rules, enforced twice.

A FineTuneJob makes the operator create pods, so without these rules anyone who may create a FineTuneJob could
run any image, with any ServiceAccount's token, any PVC and any priority class of its namespace: the operator
would be a confused deputy. Each rule exists

* as CEL, in a ValidatingAdmissionPolicy that the API server evaluates against the *requesting user* when a
  FineTuneJob is created (`authorizer` checks what that user may do): `make crds` writes it to
  charts/kubetune/files/admission-policy.yaml and, with a binding and its parameters, to
  crds/policy/admission-policy.yaml;
* in Python, for clusters without the policy: before any child exists, a job that breaks a rule fails with
  reason `PolicyDenied` and the rule's message. Who created an object is not recorded in it, so the operator
  cannot check what the author may do: unless the policy was in force when the job was created (its binding,
  KUBETUNE_POLICY_BINDING, and the policy are read from the API server, with the time they last changed), a job
  that names a ServiceAccount, a PVC or a priority class is refused.

What "use" means for each object a job names (docs/security.md): the author could do it directly.
* `storage.serviceAccountName` S: create S's token (`create serviceaccounts/token` S), or create pods, in the
  job's namespace (a pod can run as any ServiceAccount of its namespace).
* a PVC C (a `pvc://C/...` URI): `use persistentvolumeclaims` C (a verb for RBAC only, granted per claim), or
  create pods, in the job's namespace.
* `scheduling.priorityClassName` P: `use priorityclasses.scheduling.k8s.io` P (cluster-wide).
* a Secret K the job names (`storage.secretRef` other than the platform's default credentials, and
  `tracking.mlflow.secretRef`): `get secrets` K in the job's namespace (the pods would hold its keys, and could
  send them to any endpoint the job names).

Where the platform's default credentials go: only to the platform's endpoint. A job that sets its own
`storage.endpoint` (another than the chart's `storage.endpoint`) never gets the default Secret filled in, and may
not name it; with `policy.allowedStorageEndpoints` set, its endpoint must be one of them.

A FineTuneSweep's template is judged by the same rules, against the sweep's author, and the trials the operator
creates for an admitted sweep are admitted ("FineTuneSweeps" below).

And where the job's data may be, whoever its author is: with `policy.allowedStoragePrefixes` set, every storage URI
of the spec (base model, dataset splits, data cache, checkpoints, output) starts with one of the prefixes, each
with `{namespace}` replaced by the job's namespace (`s3://ml-{namespace}/`), and has no `.` or `..` segment.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubetune_api import (
    API_GROUP,
    DEFAULT_TRAINER_IMAGE,
    FineTuneJobSpec,
    FineTuneSweepSpec,
    Reason,
    ResourcesSpec,
    RunPolicy,
    uri_allowed,
)

from . import PLURAL, SWEEP_LABEL, SWEEPS
from .conditions import get_condition

POLICY = "kubetune-finetunejobs"  # the ValidatingAdmissionPolicy, and its binding (the chart prefixes its release)
PARAMS = "kubetune-policy"  # the parameters ConfigMap
PARAMS_NAMESPACE = "kubetune-system"  # where crds/policy/admission-policy.yaml puts it
REASON = Reason.PolicyDenied
SPEC = "spec"  # how every rule's message starts: the field it names
TRIAL_VERB = "trial"  # RBAC only, on finetunesweeps: the operator's, to create an admitted sweep's trials

IMAGE = ("spec.image: this image is not allowed here; use an image under the platform's allowed prefixes "
         "(policy.allowedImagePrefixes), or leave spec.image unset for the platform's trainer")
CREDENTIALS = ("spec.storage: jobs in this namespace may not use the platform's default storage credentials "
               "(storage.secretName); set storage.secretRef to a Secret of this namespace, or "
               "storage.serviceAccountName, or ask the platform team to allow the namespace "
               "(policy.defaultCredentialsNamespaces)")
REMOTE_CODE = ("spec.baseModel.trustRemoteCode: this platform does not run code from model folders "
               "(policy.allowTrustRemoteCode is false); use a model that transformers supports natively")
SERVICE_ACCOUNT = ("spec.storage.serviceAccountName: you may not use this ServiceAccount: a FineTuneJob may "
                   "name one only if its author may create its token (create serviceaccounts/token) or create "
                   "pods in the namespace")
CLAIM = ("spec: a pvc:// URI names a PersistentVolumeClaim you may not use: a FineTuneJob may mount a claim only "
         "if its author has the verb `use` on it (persistentvolumeclaims) or may create pods in the namespace")
PRIORITY = ("spec.scheduling.priorityClassName: you may not use this priority class: a FineTuneJob may name one "
            "only if its author has the verb `use` on it (priorityclasses.scheduling.k8s.io)")
DEFAULT_GPU_RESOURCE = ResourcesSpec.model_fields["gpu_resource_name"].default  # nvidia.com/gpu
DEFAULT_GRACE_SECONDS = RunPolicy.model_fields["termination_grace_period_seconds"].default
NODE_SELECTOR = ("spec.resources.nodeSelector: you may not select these nodes: a FineTuneJob may set a node "
                 "selector outside the platform's allowed ones (policy.allowedNodeSelectors) only if its author may "
                 "create pods in the namespace")
TOLERATION = ("spec.resources.tolerations: you may not tolerate these taints: a FineTuneJob may tolerate taints "
              "outside the platform's allowed ones (policy.allowedTolerations; `operator: Exists` without a key "
              "tolerates every taint, without an effect every effect) only if its author may create pods in the "
              "namespace")
AFFINITY = ("spec.resources.affinity: a FineTuneJob may set affinity only if its author may create pods in the "
            "namespace (a required podAntiAffinity can keep other pods off the nodes); use resources.nodeSelector "
            "with the platform's allowed node selectors")
GPU_RESOURCE = ("spec.resources.gpuResourceName: a FineTuneJob may request a resource outside the platform's "
                "allowed GPU resource names (policy.allowedGPUResourceNames) only if its author may create pods in "
                "the namespace")
GRACE = ("spec.runPolicy.terminationGracePeriodSeconds: a FineTuneJob may set a grace period above the "
         "platform's maximum (policy.maxTerminationGracePeriodSeconds) only if its author (or whoever raises it) "
         "may create pods in the namespace")
QUEUE = ("spec.scheduling.queueName: this platform runs every FineTuneJob through Kueue (policy.requireQueue); "
         "set scheduling.queueName to a LocalQueue of this namespace")
SECRET = ("spec: a secretRef (storage.secretRef, tracking.mlflow.secretRef) names a Secret you may not use: a "
          "FineTuneJob may name a Secret other than the platform's default storage credentials only if its author "
          "may read it (get secrets) in the namespace")
ENDPOINT = ("spec.storage.endpoint: this storage endpoint is not allowed here; use one of the platform's "
            "(policy.allowedStorageEndpoints), or leave storage.endpoint unset for the platform's default")
DEFAULT_CREDENTIALS_ENDPOINT = (
    "spec.storage: the platform's default storage credentials (storage.secretName) go only to the platform's "
    "endpoint; with storage.endpoint set to another, set storage.secretRef to a Secret of this namespace, or "
    "storage.serviceAccountName, or leave storage.endpoint unset")
STORAGE_PREFIX = ("spec: these storage URIs are outside the prefixes this namespace may use "
                  "(policy.allowedStoragePrefixes)")
UNCHECKED = ("; the operator cannot check that the job's author may use it, because this cluster does not enforce "
             "the Kubetune admission policy (install it: the chart's policy.admission.enabled, or "
             "crds/policy/admission-policy.yaml)")


@dataclass(frozen=True)
class Scheduling:
    """Where and how any author's pods may run (the chart's policy.allowedNodeSelectors, allowedTolerations,
    allowedGPUResourceNames, maxTerminationGracePeriodSeconds, requireQueue; KUBETUNE_POLICY_NODE_SELECTORS,
    _TOLERATIONS, _GPU_RESOURCE_NAMES, _MAX_GRACE_SECONDS, _REQUIRE_QUEUE). Outside them, a job needs its
    author's right to create pods in the namespace (see "scheduling and resource fields" below)."""

    node_selectors: tuple[str, ...] = ()  # "key=value", or "key": any value
    tolerations: tuple[str, ...] = ()  # "key[=value][:effect]": no value, any value; no effect, every effect
    gpu_resource_names: tuple[str, ...] = (DEFAULT_GPU_RESOURCE,)
    max_grace_seconds: int = 3600
    require_queue: bool = False  # every job names scheduling.queueName (Kueue)

    def params(self) -> dict[str, str]:
        return {"nodeSelectors": ",".join(self.node_selectors), "tolerations": ",".join(self.tolerations),
                "gpuResourceNames": ",".join(self.gpu_resource_names),
                "maxTerminationGracePeriodSeconds": str(self.max_grace_seconds),
                "requireQueue": str(self.require_queue).lower()}


@dataclass(frozen=True)
class Settings:
    """The platform's choices (the chart's `policy.*` and `storage.secretName`), as the operator's environment
    (KUBETUNE_POLICY_* and KUBETUNE_STORAGE_SECRET_NAME, read by settings.OperatorSettings.from_env) and as the
    policy's parameters ConfigMap."""

    image_prefixes: tuple[str, ...]
    credentials_secret: str = ""
    credentials_namespaces: tuple[str, ...] = ()  # "*": every namespace
    allow_trust_remote_code: bool = False
    storage_prefixes: tuple[str, ...] = ()  # "{namespace}": the job's; empty: any URI
    storage_endpoint: str = ""  # the platform's (KUBETUNE_STORAGE_ENDPOINT): the default credentials go only there
    storage_endpoints: tuple[str, ...] = ()  # the endpoints a job may set; empty: any
    binding: str = ""  # the ValidatingAdmissionPolicyBinding that tells the operator the API server checks authors
    scheduling: Scheduling = Scheduling()

    def params(self) -> dict[str, str]:
        """The data of the policy's parameters ConfigMap."""
        return {"imagePrefixes": ",".join(self.image_prefixes), "credentialsSecret": self.credentials_secret,
                "credentialsNamespaces": ",".join(self.credentials_namespaces),
                "allowTrustRemoteCode": str(self.allow_trust_remote_code).lower(),
                "storagePrefixes": ",".join(self.storage_prefixes), "defaultEndpoint": self.storage_endpoint,
                "storageEndpoints": ",".join(self.storage_endpoints), **self.scheduling.params()}


def repository(image: str) -> str:
    """ghcr.io/kubetune/trainer:0.1.0 -> ghcr.io/kubetune/trainer (a registry's port is not a tag)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def image_allowed(image: str, prefixes: tuple[str, ...]) -> bool:
    """A prefix ending in "/" allows every image under it; any other prefix is a repository: the image is that
    repository, with a tag or a digest or neither."""
    return any(image.startswith(p) if p.endswith("/") else image == p or image.startswith((p + ":", p + "@"))
               for p in prefixes)


def same_endpoint(a: str, b: str) -> bool:
    """The same endpoint URL, but for a trailing slash (as the admission policy's CEL compares them)."""
    return a in (b, b + "/") or a + "/" == b


def _same_endpoint(a: str, b: str) -> str:
    """same_endpoint in CEL, for two CEL string expressions."""
    return f"{a} == {b} || {a} == {b} + '/' || {a} + '/' == {b}"


def own_endpoint(endpoint: str | None, settings: Settings) -> bool:
    """Whether a job's storage.endpoint is its own: set, and not the platform's."""
    return bool(endpoint) and not same_endpoint(endpoint, settings.storage_endpoint)


def uses_default_credentials(spec: FineTuneJobSpec, settings: Settings) -> bool:
    """The job names the platform's default Secret, or no credentials at all and no endpoint of its own (the
    operator fills the default in)."""
    storage = spec.storage
    named = storage.secret_ref.name if storage.secret_ref else ""
    return bool(settings.credentials_secret) and (named == settings.credentials_secret or not (
        named or storage.service_account_name or own_endpoint(storage.endpoint, settings)))


def storage_uris(spec: FineTuneJobSpec) -> list[str]:
    """Every storage URI the spec sets, in the order of the admission policy's `uris`."""
    return [u for u in (spec.base_model.uri, spec.dataset.train, spec.output.uri, spec.dataset.validation,
                        spec.dataset.test, spec.checkpoint.uri, spec.dataset.cache_uri) if u]


def storage_prefixes(namespace: str, settings: Settings) -> list[str]:
    return [p.replace("{namespace}", namespace) for p in settings.storage_prefixes]


def storage_prefix_message(outside: list[str], prefixes: list[str]) -> str:
    """The rule's message: the URIs outside the prefixes, and the prefixes (the same text as its CEL)."""
    return f"{STORAGE_PREFIX}: {', '.join(outside)}; allowed: {', '.join(prefixes)} (no . or .. path segments)"


def violations(namespace: str, spec: FineTuneJobSpec, settings: Settings, author_checked: bool) -> list[str]:
    """The messages of the rules the job breaks. `author_checked`: the API server enforces the admission policy,
    so it has checked that the job's author may use what the job names."""
    out = []
    if spec.image and not image_allowed(spec.image, settings.image_prefixes):
        out.append(IMAGE)
    allowed = {"*", namespace} & set(settings.credentials_namespaces)
    if uses_default_credentials(spec, settings) and not allowed:
        out.append(CREDENTIALS)
    if spec.base_model.trust_remote_code and not settings.allow_trust_remote_code:
        out.append(REMOTE_CODE)
    endpoint = spec.storage.endpoint or ""
    own = own_endpoint(endpoint, settings)
    if own and settings.storage_endpoints and not any(same_endpoint(endpoint, e) for e in settings.storage_endpoints):
        out.append(ENDPOINT)
    named = spec.storage.secret_ref.name if spec.storage.secret_ref else ""
    if own and settings.credentials_secret and named == settings.credentials_secret:
        out.append(DEFAULT_CREDENTIALS_ENDPOINT)
    prefixes = storage_prefixes(namespace, settings)
    outside = [u for u in storage_uris(spec) if not uri_allowed(u, prefixes)]
    if outside:
        out.append(storage_prefix_message(outside, prefixes))
    if not author_checked:
        out += [message + UNCHECKED for value, message in _author_dependent(spec, settings) if value]
    return out + scheduling_violations(spec, settings, author_checked)


def own_secrets(spec: FineTuneJobSpec, settings: Settings) -> list[str]:
    """The Secrets the job names whose use depends on its author, in the order of the admission policy's `secrets`:
    storage.secretRef unless it is the platform's default credentials, and tracking.mlflow.secretRef."""
    named = spec.storage.secret_ref.name if spec.storage.secret_ref else ""
    mlflow = spec.tracking.mlflow
    tracking = mlflow.secret_ref.name if mlflow and mlflow.secret_ref else ""
    return [s for s in ("" if named == settings.credentials_secret else named, tracking) if s]


def _author_dependent(spec: FineTuneJobSpec, settings: Settings) -> list[tuple[object, str]]:
    """What the job names whose use depends on its author (empty values: nothing named), with each rule's
    message."""
    return [(spec.storage.service_account_name, SERVICE_ACCOUNT), (spec.pvc_claims(), CLAIM),
            (spec.scheduling.priority_class_name, PRIORITY), (own_secrets(spec, settings), SECRET)]


def author_checked(meta: dict, policy_since: str | None) -> bool:
    """Whether the API server checked this job's author: the admission policy was in force, as it is now, before
    the job was created (one created earlier, say in a namespace not yet served, was never checked)."""
    created = meta.get("creationTimestamp")
    return bool(policy_since and created and created > policy_since)


def needs_admission_check(body: dict, settings: Settings) -> bool:
    """Whether the operator must ask the API server if the admission policy is in force before it decides: the
    job has no child yet (no Validated condition) and names an object whose use depends on its author, or sets a
    scheduling field outside the `settings`; or, at any time, its grace period is above the maximum (runPolicy
    is mutable: it is checked again before each training Job)."""
    try:
        spec = FineTuneJobSpec.model_validate(body.get("spec") or {})
    except ValueError:  # the reconcile reports it
        return False
    if _grace_outside(spec, settings.scheduling):
        return True
    if get_condition(body.get("status") or {}, "Validated"):
        return False
    return _needs_author(spec, settings)


def _needs_author(spec: FineTuneJobSpec, settings: Settings) -> bool:
    """The job names an object whose use depends on its author, or sets a scheduling field outside `settings`."""
    return any(value for value, _ in _author_dependent(spec, settings)) or bool(
        _scheduling_outside(spec, settings.scheduling))


# -- FineTuneSweeps (issue 30) -------------------------------------------------------------------------------------
# A sweep's trials are FineTuneJobs the operator creates, so the rules judge the sweep's author on the template
# when the sweep is created (the template is immutable), and each trial of an admitted sweep carries the sweep's
# label: the admission policy skips the author rules for a trial only if its creator has the RBAC-only verb
# TRIAL_VERB on that sweep (the operator's), so no user can pass a job of their own off as a trial.
# The parameters may set only TUNABLE fields (hyperparameters, method.lora, objectiveParams), which no rule reads
# (CHECKED_FIELDS), so every trial asks for what its template does.

CHECKED_FIELDS = ("image", "storage", "baseModel", "dataset", "output", "checkpoint", "tracking", "scheduling",
                  "resources", "runPolicy")  # the spec fields the rules read


def sweep_message(message: str) -> str:
    """A rule's message for a sweep: it names the template's field (spec.template.storage...)."""
    return "spec.template" + message.removeprefix(SPEC)


def sweep_job_spec(spec: FineTuneSweepSpec) -> FineTuneJobSpec:
    """What the rules judge of a sweep: its template with the sweep's output.uri, under which every trial
    publishes and (unless the template names one) caches its data."""
    template = spec.template
    return template.model_copy(update={"output": template.output.model_copy(update={"uri": spec.output.uri})})


def sweep_violations(namespace: str, spec: FineTuneSweepSpec, settings: Settings, author_checked: bool) -> list[str]:
    """The messages of the rules the sweep's trials would break, naming the template's fields."""
    return [sweep_message(m) for m in violations(namespace, sweep_job_spec(spec), settings, author_checked)]


def sweep_needs_admission_check(body: dict, settings: Settings) -> bool:
    """Whether the operator must ask the API server if the admission policy is in force before the sweep's first
    trial: its template names an object whose use depends on its author, or sets a scheduling field outside the
    `settings`."""
    try:
        spec = FineTuneSweepSpec.model_validate(body.get("spec") or {})
    except ValueError:  # the reconcile reports it
        return False
    return _needs_author(sweep_job_spec(spec), settings)


# -- scheduling and resource fields (issue 27.3) and the queue requirement (27.7) ---------------------------------
# A pod's node selector, tolerations, affinity, extended resources and grace period decide which nodes it may use
# and for how long. Outside the platform's Scheduling lists, a job may set them only if its author may create
# pods in the namespace (they could create such a pod directly). Every field but the grace period is immutable;
# runPolicy.terminationGracePeriodSeconds is not, so the admission policy also judges an update that raises it
# (against the user who raises it), and the operator checks it again before it creates a training Job.

def node_selector_allowed(key: str, value: str, allowed: tuple[str, ...]) -> bool:
    return key in allowed or f"{key}={value}" in allowed


def toleration_allowed(toleration, allowed: tuple[str, ...]) -> bool:
    """The toleration tolerates no more than one allowed entry `key[=value][:effect]` does: the same key; the
    entry's value, if it names one (then `operator: Exists` is too broad); the entry's effect, if it names one
    (then a toleration without an effect, which tolerates every effect, is too broad). tolerationSeconds only
    narrows it."""
    key, value, effect = toleration.key or "", toleration.value or "", toleration.effect or ""
    equal = toleration.operator != "Exists"
    for entry in allowed:
        head, _, allowed_effect = entry.partition(":")
        allowed_key, named, allowed_value = head.partition("=")
        if key == allowed_key and (not named or (equal and value == allowed_value)) and \
                (not allowed_effect or effect == allowed_effect):
            return True
    return False


def _grace_outside(spec: FineTuneJobSpec, scheduling: Scheduling) -> bool:
    return spec.run_policy.termination_grace_period_seconds > scheduling.max_grace_seconds


def _scheduling_outside(spec: FineTuneJobSpec, scheduling: Scheduling) -> list[str]:
    """The messages of the scheduling rules the job is outside of (each needs an author who may create pods)."""
    res = spec.resources
    checks = [
        (NODE_SELECTOR, any(not node_selector_allowed(k, v, scheduling.node_selectors)
                            for k, v in (res.node_selector or {}).items())),
        (TOLERATION, any(not toleration_allowed(t, scheduling.tolerations) for t in res.tolerations or [])),
        (AFFINITY, bool(res.affinity)),
        (GPU_RESOURCE, res.gpus_per_worker > 0 and res.gpu_resource_name not in scheduling.gpu_resource_names),
        (GRACE, _grace_outside(spec, scheduling)),
    ]
    return [message for message, outside in checks if outside]


def scheduling_violations(spec: FineTuneJobSpec, settings: Settings, author_checked: bool) -> list[str]:
    """The scheduling rules the job breaks (see violations)."""
    out = [QUEUE] if settings.scheduling.require_queue and not spec.scheduling.queue_name else []
    if not author_checked:
        out += [message + UNCHECKED for message in _scheduling_outside(spec, settings.scheduling)]
    return out


def training_violations(spec: FineTuneJobSpec, settings: Settings, author_checked: bool) -> list[str]:
    """What the operator checks again before it creates a training Job: the mutable grace period."""
    return [GRACE + UNCHECKED] if not author_checked and _grace_outside(spec, settings.scheduling) else []


# -- the same rules in CEL ---------------------------------------------------------------------------------------

OPTIONAL_URIS = ("dataset.?validation", "dataset.?test", "?checkpoint.?uri", "dataset.?cacheUri")
# Every rule reads `variables.spec`: a FineTuneJob's spec, or a FineTuneSweep's template (its trials' spec). The
# URIs add `object.spec.output.uri`: the job's output, or the sweep's, under which its trials publish and cache.
# A trial the operator creates for an admitted sweep (authorChecked) skips the rules on its author.
VARIABLES = [
    ("sweep", f"request.resource.resource == '{SWEEPS}'"),
    ("spec", "variables.sweep ? object.spec.template : object.spec"),
    ("authorChecked", f"!variables.sweep && '{SWEEP_LABEL}' in object.metadata.?labels.orValue({{}}) && "
                      f"authorizer.group('{API_GROUP}').resource('{SWEEPS}').namespace(request.namespace)"
                      f".name(object.metadata.labels['{SWEEP_LABEL}']).check('{TRIAL_VERB}').allowed()"),
    ("imagePrefixes", "params.data.?imagePrefixes.orValue('').split(',').filter(p, p != '')"),
    ("defaultSecret", "params.data.?credentialsSecret.orValue('')"),
    ("credentialsNamespaces", "params.data.?credentialsNamespaces.orValue('').split(',')"),
    ("secretName", "variables.spec.?storage.?secretRef.?name.orValue('')"),
    ("secrets", "[variables.secretName == variables.defaultSecret ? '' : variables.secretName, "
                "variables.spec.?tracking.?mlflow.?secretRef.?name.orValue('')].filter(s, s != '')"),
    ("serviceAccount", "variables.spec.?storage.?serviceAccountName.orValue('')"),
    ("podCreator", "variables.authorChecked || "
                   "authorizer.group('').resource('pods').namespace(request.namespace).check('create').allowed()"),
    ("uris", "[variables.spec.baseModel.uri, variables.spec.dataset.train, object.spec.output.uri, "
             + ", ".join(f"variables.spec.{path}.orValue('')" for path in OPTIONAL_URIS) + "]"),
    ("claims", "variables.uris.filter(u, u.startsWith('pvc://')).map(u, u.substring(6).split('/')[0])"),
    ("priorityClass", "variables.spec.?scheduling.?priorityClassName.orValue('')"),
    ("endpoint", "variables.spec.?storage.?endpoint.orValue('')"),
    ("defaultEndpoint", "params.data.?defaultEndpoint.orValue('')"),
    ("ownEndpoint", "variables.endpoint != '' && !(" + _same_endpoint("variables.endpoint", "variables.defaultEndpoint")
                    + ")"),
    ("storageEndpoints", "params.data.?storageEndpoints.orValue('').split(',').filter(e, e != '')"),
    ("storagePrefixes", "params.data.?storagePrefixes.orValue('').split(',').filter(p, p != '')"
                        ".map(p, p.replace('{namespace}', request.namespace))"),
    ("outsidePrefixes", "variables.storagePrefixes.size() == 0 ? [] : variables.uris.filter(u, u != '' && "
                        "(u.split('/').exists(s, s == '.' || s == '..') || "
                        "!variables.storagePrefixes.exists(p, u.startsWith(p))))"),
]
VALIDATIONS = [
    ("!has(variables.spec.image) || variables.imagePrefixes.exists(p, p.endsWith('/') ? "
     "variables.spec.image.startsWith(p) : variables.spec.image == p || "
     "variables.spec.image.startsWith(p + ':') || variables.spec.image.startsWith(p + '@'))",
     IMAGE),
    ("variables.defaultSecret == '' || !(variables.secretName == variables.defaultSecret || "
     "(variables.secretName == '' && variables.serviceAccount == '' && !variables.ownEndpoint)) || "
     "variables.credentialsNamespaces.exists(n, n == '*' || n == request.namespace)", CREDENTIALS),
    ("variables.authorChecked || variables.secrets.all(s, "
     "authorizer.group('').resource('secrets').namespace(request.namespace).name(s)"
     ".check('get').allowed())", SECRET),
    ("!variables.spec.?baseModel.?trustRemoteCode.orValue(false) || "
     "params.data.?allowTrustRemoteCode.orValue('false') == 'true'", REMOTE_CODE),
    ("variables.serviceAccount == '' || variables.podCreator || authorizer.group('').resource('serviceaccounts')"
     ".subresource('token').namespace(request.namespace).name(variables.serviceAccount).check('create').allowed()",
     SERVICE_ACCOUNT),
    ("variables.podCreator || variables.claims.all(c, authorizer.group('').resource('persistentvolumeclaims')"
     ".namespace(request.namespace).name(c).check('use').allowed())", CLAIM),
    ("variables.priorityClass == '' || variables.authorChecked || "
     "authorizer.group('scheduling.k8s.io').resource('priorityclasses')"
     ".name(variables.priorityClass).check('use').allowed()", PRIORITY),
    ("!variables.ownEndpoint || variables.storageEndpoints.size() == 0 || variables.storageEndpoints.exists(e, "
     + _same_endpoint("variables.endpoint", "e") + ")", ENDPOINT),
    ("variables.defaultSecret == '' || variables.secretName != variables.defaultSecret || !variables.ownEndpoint",
     DEFAULT_CREDENTIALS_ENDPOINT),
    ("variables.outsidePrefixes.size() == 0", STORAGE_PREFIX,
     "': ' + variables.outsidePrefixes.join(', ') + '; allowed: ' + "
     "variables.storagePrefixes.join(', ') + ' (no . or .. path segments)'"),
]
_TOLERATIONS = "variables.spec.?resources.?tolerations.orValue([])"
_HEAD = "e.split(':')[0]"
SCHEDULING_VARIABLES = [  # after VARIABLES: they use variables.podCreator
    ("nodeSelector", "variables.spec.?resources.?nodeSelector.orValue({})"),
    ("allowedNodeSelectors", "params.data.?nodeSelectors.orValue('').split(',')"),
    # each allowed toleration `key[=value][:effect]` as [key, '=' if it names a value, the value, the effect]
    ("allowedTolerations", "params.data.?tolerations.orValue('').split(',').filter(e, e != '').map(e, "
                           f"[{_HEAD}.split('=')[0], {_HEAD}.contains('=') ? '=' : '', "
                           f"{_HEAD}.contains('=') ? {_HEAD}.split('=')[1] : '', "
                           "e.contains(':') ? e.split(':')[1] : ''])"),
    ("gracePeriod", f"variables.spec.?runPolicy.?terminationGracePeriodSeconds.orValue({DEFAULT_GRACE_SECONDS})"),
]
SCHEDULING_VALIDATIONS = [
    ("variables.podCreator || variables.nodeSelector.all(k, variables.allowedNodeSelectors.exists(s, "
     "s == k || s == k + '=' + variables.nodeSelector[k]))", NODE_SELECTOR),
    (f"variables.podCreator || {_TOLERATIONS}.all(t, variables.allowedTolerations.exists(a, "
     "t.?key.orValue('') == a[0] && "
     "(a[1] == '' || (t.?operator.orValue('Equal') == 'Equal' && t.?value.orValue('') == a[2])) && "
     "(a[3] == '' || t.?effect.orValue('') == a[3])))", TOLERATION),
    ("variables.podCreator || size(variables.spec.?resources.?affinity.orValue({})) == 0", AFFINITY),
    ("variables.spec.?resources.?gpusPerWorker.orValue(1) == 0 || variables.podCreator || "
     f"params.data.?gpuResourceNames.orValue('{DEFAULT_GPU_RESOURCE}').split(',').exists(n, "
     f"n == variables.spec.?resources.?gpuResourceName.orValue('{DEFAULT_GPU_RESOURCE}'))", GPU_RESOURCE),
    ("variables.gracePeriod <= int(params.data.?maxTerminationGracePeriodSeconds"
     f".orValue('{Scheduling().max_grace_seconds}')) || variables.podCreator", GRACE),
    ("params.data.?requireQueue.orValue('false') != 'true' || "
     "variables.spec.?scheduling.?queueName.orValue('') != ''", QUEUE),
]
# Updates are judged only when they raise the grace period (the one mutable field a rule reads): never the
# operator's own updates (finalizers, annotations), nor edits of other runPolicy fields.
MATCH_CONDITIONS = [{
    "name": "create-or-raise-grace-period",
    "expression": "request.operation == 'CREATE' || "
                  f"object.spec.?runPolicy.?terminationGracePeriodSeconds.orValue({DEFAULT_GRACE_SECONDS}) > "
                  f"oldObject.spec.?runPolicy.?terminationGracePeriodSeconds.orValue({DEFAULT_GRACE_SECONDS})",
}]
LABELS = {"app.kubernetes.io/name": "kubetune"}
ADMISSION = "admissionregistration.k8s.io/v1"


def admission_policy() -> dict:
    """The ValidatingAdmissionPolicy. CREATE is checked, and an UPDATE only when it raises the grace period
    (MATCH_CONDITIONS), against the user who raises it: every other field a rule reads is immutable afterwards
    (the CRD's transition rules), and the operator's own updates (finalizers, annotations) must not be judged
    against what the operator may do."""
    return {
        "apiVersion": ADMISSION, "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": POLICY, "labels": LABELS},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
            "matchConstraints": {"resourceRules": [{"apiGroups": [API_GROUP], "apiVersions": ["*"],
                                                    "operations": ["CREATE", "UPDATE"],
                                                    "resources": [PLURAL, SWEEPS]}]},
            "matchConditions": MATCH_CONDITIONS,
            "variables": [{"name": name, "expression": expr} for name, expr in [*VARIABLES, *SCHEDULING_VARIABLES]],
            "validations": [_validation(*rule) for rule in [*VALIDATIONS, *SCHEDULING_VALIDATIONS]],
        },
    }


def _validation(expr: str, message: str, details: str = "") -> dict:
    """A rule: its CEL, its message, and the CEL that builds the message (falling back to it if it fails): for a
    sweep, it names the template's field (sweep_message); `details`, CEL appended to it, names the values."""
    head = "(variables.sweep ? 'spec.template' : 'spec') + "
    return {"expression": expr, "message": message, "reason": "Forbidden",
            "messageExpression": head + json.dumps(message.removeprefix(SPEC)) + (f" + {details}" if details else "")}


def binding(namespace: str = PARAMS_NAMESPACE) -> dict:
    return {"apiVersion": ADMISSION, "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": POLICY, "labels": LABELS},
            "spec": {"policyName": POLICY, "validationActions": ["Deny"],
                     "paramRef": {"name": PARAMS, "namespace": namespace, "parameterNotFoundAction": "Deny"}}}


def params_config_map(settings: Settings, namespace: str = PARAMS_NAMESPACE) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": PARAMS, "namespace": namespace, "labels": LABELS}, "data": settings.params()}


HEADER = ("# Generated by `python -m kubetune_operator.policy` (make crds) from "
          "operator/kubetune_operator/policy.py.\n# ")
FILES = {  # path -> (its note, its documents)
    "charts/kubetune/files/admission-policy.yaml": (
        "Do not edit; the chart renames it per release.", lambda: [admission_policy()]),
    "crds/policy/admission-policy.yaml": (
        f"Do not edit. For installs without Helm: create the namespace {PARAMS_NAMESPACE}, then apply; edit the "
        "ConfigMap's data.",
        lambda: [admission_policy(), binding(),
                 params_config_map(Settings(image_prefixes=(repository(DEFAULT_TRAINER_IMAGE),)))]),
}


def render(docs: list[dict], note: str) -> str:
    return HEADER + note + "\n" + "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120) for d in docs)


def write(root: Path) -> None:
    for path, (note, docs) in FILES.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(docs(), note))


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd())
