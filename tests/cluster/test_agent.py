"""The process node agent against the real control plane: scheduler, Job controller, garbage collector."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kubetune_dev.cluster.agent_fixtures import NODE_GPUS, NODE_NAME
from kubetune_dev.cluster.agent_pod import expand, load_image_map, resolve_image

from tests import kube
from tests.kube import free_port, wait_for

pytestmark = pytest.mark.cluster
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures"]

IMAGE = "ghcr.io/kubetune/trainer:test"


def kubectl(cp, *args: str, stdin: str | None = None, check: bool = True) -> str:
    return kube.kubectl(cp, *args, stdin=stdin, check=check, timeout=400).stdout


def apply(cp, namespace: str, *objects: dict) -> None:
    kubectl(cp, "apply", "-n", namespace, "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                      "items": list(objects)}))


def get(cp, namespace: str, kind: str, name: str = "", selector: str = "") -> dict:
    args = ["get", kind, "-n", namespace, "-o", "json"] + ([name] if name else ["-l", selector])
    return json.loads(kubectl(cp, *args))


def template(script: str, container: dict | None = None, metadata: dict | None = None, **spec) -> dict:
    """A pod template running a python `script` (restartPolicy Never)."""
    main = {"name": "main", "image": IMAGE, "command": ["python", "-u", "-c", textwrap.dedent(script)],
            **(container or {})}
    spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 30, "containers": [main], **spec}
    return {"metadata": metadata or {}, "spec": spec}


def pod(name: str, script: str, **kw) -> dict:
    t = template(script, **kw)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **t["metadata"]}, "spec": t["spec"]}


def phase(cp, namespace: str, name: str) -> str:
    return get(cp, namespace, "pod", name).get("status", {}).get("phase", "")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_node_ready_with_gpu_capacity(control_plane, node_agent):
    assert NODE_NAME in kubectl(control_plane, "get", "nodes")
    node = json.loads(kubectl(control_plane, "get", "node", NODE_NAME, "-o", "json"))
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert node["status"]["capacity"]["nvidia.com/gpu"] == str(NODE_GPUS)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(NODE_GPUS)
    lease = kubectl(control_plane, "get", "lease", "-n", "kube-node-lease", NODE_NAME, "-o", "json")
    lease = json.loads(lease)
    assert lease["spec"]["holderIdentity"] == NODE_NAME


RENDEZVOUS = """
    import os, socket, time
    index = int(os.environ["JOB_COMPLETION_INDEX"])
    me = socket.gethostname()
    if index == 0:
        server = socket.create_server((os.environ["POD_IP"], 29500))
        server.settimeout(120)
        conn, _ = server.accept()
        print("server got:", conn.recv(100).decode())
        conn.sendall(f"hello from {me}".encode())
    else:
        deadline = time.time() + 120
        while True:
            try:
                s = socket.create_connection(("rdzv-0.rdzv", 29500), timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        s.sendall(f"hello from {me}".encode())
        print("client got:", s.recv(100).decode())
"""


def test_indexed_job_pods_reach_each_other_by_service_names(control_plane, node_agent, namespace):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "rdzv"},
               "spec": {"clusterIP": "None", "selector": {"job-name": "rdzv"}, "ports": [{"port": 29500}]}}
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "rdzv"},
           "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                    "template": template(RENDEZVOUS, subdomain="rdzv", container={"env": [pod_ip]})}}
    apply(control_plane, namespace, service, job)
    kubectl(control_plane, "wait", "-n", namespace, "--for=condition=Complete", "job/rdzv", "--timeout=180s")

    pods = get(control_plane, namespace, "pods", selector="job-name=rdzv")["items"]
    by_host = {p["spec"]["hostname"]: p for p in pods}
    assert sorted(by_host) == ["rdzv-0", "rdzv-1"]
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2 and all(ip.startswith("127.") for ip in ips)
    assert all(p["spec"]["nodeName"] == NODE_NAME for p in pods)
    server = node_agent.logs(namespace, by_host["rdzv-0"]["metadata"]["name"])
    client = node_agent.logs(namespace, by_host["rdzv-1"]["metadata"]["name"])
    assert "server got: hello from rdzv-1" in server
    assert "client got: hello from rdzv-0" in client
    for p in pods:
        status = p["status"]["containerStatuses"][0]
        assert status["state"]["terminated"]["reason"] == "Completed"
        assert {c["type"] for c in p["status"]["conditions"]} >= {"PodScheduled", "Initialized", "Ready"}


ENV_AND_VOLUMES = """
    import json, os, socket
    files = {}
    for root in ("/etc/kt-config", "/etc/kt-secret", "/etc/kt-podinfo"):
        for name in sorted(os.listdir(root)):
            if not name.startswith(".."):
                files[f"{root}/{name}"] = open(f"{root}/{name}").read()
    open("/kt-scratch/x", "w").write("scratch")
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    from kubernetes import client, config
    config.load_incluster_config()  # the projected token + ca.crt, KUBERNETES_SERVICE_HOST/PORT
    version = client.VersionApi().get_code().git_version
    keys = ["GREETING", "PASSWORD", "POD_NAME", "POD_NS", "POD_IP", "NODE", "APP", "NOTE", "MEM_MI",
            "CFG_greeting", "SECRET_password", "FROM_INIT"]
    print(json.dumps({"env": {k: os.environ.get(k) for k in keys}, "files": files,
                      "hostname": socket.gethostname(), "hosts": open("/etc/hosts").read(),
                      "init": open("/kt-scratch/init").read(), "version": version,
                      "sa_namespace": open(f"{sa}/namespace").read()}))
    open("/dev/termination-log", "w").write("all good")
"""


def test_env_value_from_and_volumes(control_plane, node_agent, namespace):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
          "data": {"greeting": "hello", "app.conf": "x=1\n"}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"},
              "stringData": {"password": "s3cret"}}

    def ref(kind, **kw):
        return {"valueFrom": {kind: kw}}

    env = [
        {"name": "GREETING", **ref("configMapKeyRef", name="cfg", key="greeting")},
        {"name": "PASSWORD", **ref("secretKeyRef", name="sec", key="password")},
        {"name": "POD_NAME", **ref("fieldRef", fieldPath="metadata.name")},
        {"name": "POD_NS", **ref("fieldRef", fieldPath="metadata.namespace")},
        {"name": "POD_IP", **ref("fieldRef", fieldPath="status.podIP")},
        {"name": "NODE", **ref("fieldRef", fieldPath="spec.nodeName")},
        {"name": "APP", **ref("fieldRef", fieldPath="metadata.labels['app']")},
        {"name": "NOTE", **ref("fieldRef", fieldPath="metadata.annotations['note']")},
        {"name": "MEM_MI", **ref("resourceFieldRef", resource="limits.memory", divisor="1Mi")},
    ]
    volumes = [
        {"name": "config", "configMap": {"name": "cfg"}},
        {"name": "secret", "secret": {"secretName": "sec"}},
        {"name": "podinfo", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
        {"name": "scratch", "emptyDir": {}},
    ]
    mounts = [{"name": "config", "mountPath": "/etc/kt-config"},
              {"name": "secret", "mountPath": "/etc/kt-secret"},
              {"name": "podinfo", "mountPath": "/etc/kt-podinfo"},
              {"name": "scratch", "mountPath": "/kt-scratch"}]
    init = {"name": "init", "image": IMAGE, "command": ["sh", "-c", "echo $(FROM) > /kt-scratch/init"],
            "env": [{"name": "FROM", "value": "init-ran"}], "volumeMounts": [mounts[3]]}
    meta = {"labels": {"app": "envtest"}, "annotations": {"note": "hi"}}
    p = pod("envtest", ENV_AND_VOLUMES, metadata=meta, volumes=volumes, initContainers=[init], container={
                "env": env + [{"name": "FROM_INIT", "value": "$(GREETING)-expanded"}],
                "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"},
                            {"secretRef": {"name": "sec"}, "prefix": "SECRET_"}],
                "volumeMounts": mounts, "resources": {"limits": {"memory": "256Mi"}}})
    apply(control_plane, namespace, cm, secret, p)
    wait_for("envtest to end", lambda: phase(control_plane, namespace, "envtest") in ("Succeeded", "Failed"))
    logs = node_agent.logs(namespace, "envtest", "main")
    assert phase(control_plane, namespace, "envtest") == "Succeeded", logs
    out = json.loads(logs.strip().splitlines()[-1])
    status = get(control_plane, namespace, "pod", "envtest")["status"]
    assert out["env"] == {
        "GREETING": "hello", "PASSWORD": "s3cret", "POD_NAME": "envtest", "POD_NS": namespace,
        "POD_IP": status["podIP"], "NODE": NODE_NAME, "APP": "envtest", "NOTE": "hi", "MEM_MI": "256",
        "CFG_greeting": "hello", "SECRET_password": "s3cret", "FROM_INIT": "hello-expanded"}
    assert out["files"]["/etc/kt-config/app.conf"] == "x=1\n"
    assert out["files"]["/etc/kt-secret/password"] == "s3cret"
    assert out["files"]["/etc/kt-podinfo/name"] == "envtest"
    assert 'app="envtest"' in out["files"]["/etc/kt-podinfo/labels"]
    assert out["init"].strip() == "init-ran"
    assert out["hostname"] == "envtest"
    assert out["version"].startswith("v1.") and out["sa_namespace"] == namespace
    assert f"{status['podIP']}\tenvtest" in out["hosts"]
    main = status["containerStatuses"][0]["state"]["terminated"]
    assert (main["exitCode"], main["reason"], main["message"]) == (0, "Completed", "all good")
    assert status["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert not Path("/etc/kt-config/app.conf").exists(), "volumes must only be mounted in the pod"


def test_failed_container_reports_exit_code_and_log_message(control_plane, node_agent, namespace):
    p = pod("fails", "import sys; print('something broke'); sys.exit(3)",
            container={"terminationMessagePolicy": "FallbackToLogsOnError"})
    apply(control_plane, namespace, p)
    wait_for("pod to fail", lambda: phase(control_plane, namespace, "fails") == "Failed")
    status = get(control_plane, namespace, "pod", "fails")["status"]
    term = status["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert "something broke" in term["message"]
    assert "something broke" in kubectl(control_plane, "logs", "-n", namespace, "fails")  # the kubelet API


SIGTERM_TRAP = """
    import os, signal, sys, time
    def on_term(signum, frame):
        open("/out/sigterm", "w").write(str(os.getpid()))
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("pid", os.getpid())
    while True:
        time.sleep(0.1)
"""


def test_deleting_a_running_pod_sends_sigterm(control_plane, node_agent, namespace, tmp_path):
    p = pod("trap", SIGTERM_TRAP, volumes=[{"name": "out", "hostPath": {"path": str(tmp_path)}}],
            container={"volumeMounts": [{"name": "out", "mountPath": "/out"}]})
    apply(control_plane, namespace, p)
    log = wait_for("the pod to print its pid", lambda: _logs(node_agent, namespace, "trap").startswith("pid"))
    pid = int(_logs(node_agent, namespace, "trap").split()[1])
    assert log and alive(pid)
    kubectl(control_plane, "delete", "pod", "-n", namespace, "trap", "--timeout=60s")
    assert (tmp_path / "sigterm").read_text() == str(pid)
    assert not alive(pid)
    assert not kubectl(control_plane, "get", "pods", "-n", namespace, "-o", "name").strip()


def evict(cp, namespace: str, name: str) -> None:
    """POST pods/<name>/eviction (policy/v1), as `kubectl drain` and the cluster autoscaler do."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}}
    kubectl(cp, "create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", "-f", "-",
            stdin=json.dumps(body))


CHECKPOINT_ON_SIGTERM = """
    import os, signal, sys, time
    if os.path.exists("/out/checkpoint"):
        print("resumed"); sys.exit(0)
    def on_term(signum, frame):
        time.sleep(2)  # "writing a checkpoint": longer than no grace, shorter than the pod's 30 s
        open("/out/checkpoint", "w").write(str(time.time()))
        sys.exit(75)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
"""
HOLD = "kubetune.io/test-hold"  # keeps the evicted pod's object readable after the agent deletes it


def test_an_evicted_pod_checkpoints_fails_with_disruption_target_and_is_replaced(control_plane, node_agent,
                                                                                 namespace, tmp_path):
    """The eviction API sets DisruptionTarget and deletes the pod with its grace period: SIGTERM, time to
    finish, then the terminal status (Failed, the container's exit code, DisruptionTarget kept), so the Job's
    podFailurePolicy ignores it and the Job creates a replacement without charging backoffLimit."""
    out = {"volumes": [{"name": "out", "hostPath": {"path": str(tmp_path)}}]}
    mount = {"volumeMounts": [{"name": "out", "mountPath": "/out"}]}
    ignore = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "evictee"},
           "spec": {"backoffLimit": 0, "podFailurePolicy": ignore,
                    "template": template(CHECKPOINT_ON_SIGTERM, container=mount, **out)}}
    stubborn = pod("stubborn", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print('ready', flush=True); time.sleep(3600)", metadata={"finalizers": [HOLD]},
                   terminationGracePeriodSeconds=2)
    apply(control_plane, namespace, job, stubborn)
    [first] = wait_for("the Job's pod", lambda: get(control_plane, namespace, "pods", selector="job-name=evictee")
                       ["items"])
    name = first["metadata"]["name"]
    kubectl(control_plane, "patch", "pod", "-n", namespace, name, "--type=merge",
            "-p", json.dumps({"metadata": {"finalizers": [HOLD]}}))
    try:
        for p in (name, "stubborn"):
            wait_for(f"{p} to run", lambda p=p: _logs(node_agent, namespace, p).startswith("ready"))
        started = time.monotonic()
        evict(control_plane, namespace, name)
        evict(control_plane, namespace, "stubborn")

        def failed(pod_name: str) -> dict | None:
            status = get(control_plane, namespace, "pod", pod_name)["status"]
            return status if status["phase"] == "Failed" else None

        status = wait_for("the stubborn pod to be killed", lambda: failed("stubborn"), every=0.2)
        assert 2 <= time.monotonic() - started < 15, "SIGKILL after the pod's grace period (2 s), not 30 s"
        assert any(c["type"] == "DisruptionTarget" and c["status"] == "True" for c in status["conditions"])
        assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 128 + 9

        status = wait_for("the evicted pod's terminal status", lambda: failed(name))
        assert time.monotonic() - started >= 2, "the agent waited for the process to finish its work"
        assert (tmp_path / "checkpoint").exists(), "SIGTERM was delivered and handled"
        disruption = next(c for c in status["conditions"] if c["type"] == "DisruptionTarget")
        assert (disruption["status"], disruption["reason"]) == ("True", "EvictionByEvictionAPI")
        state = status["containerStatuses"][0]["state"]
        assert list(state) == ["terminated"] and state["terminated"]["exitCode"] == 75

        kubectl(control_plane, "wait", "-n", namespace, "--for=condition=Complete", "job/evictee", "--timeout=120s")
        job_status = get(control_plane, namespace, "job", "evictee")["status"]
        assert not job_status.get("failed"), "an eviction is not charged to backoffLimit (here 0)"
        replacement = next(p for p in get(control_plane, namespace, "pods", selector="job-name=evictee")["items"]
                           if p["metadata"]["name"] != name)
        assert _logs(node_agent, namespace, replacement["metadata"]["name"]).strip() == "resumed"
    finally:
        for p in (name, "stubborn"):
            kubectl(control_plane, "patch", "pod", "-n", namespace, p, "--type=merge",
                    "-p", json.dumps({"metadata": {"finalizers": None}}), check=False)


def _logs(agent, namespace: str, pod_name: str) -> str:
    try:
        return agent.logs(namespace, pod_name, "main")
    except FileNotFoundError:
        return ""


def test_gpu_pods_get_devices_and_too_many_stay_pending(control_plane, node_agent, namespace):
    one = pod("one-gpu", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])",
              container={"resources": {"limits": {"nvidia.com/gpu": "1"}}})
    greedy = pod("greedy", "print('never runs')",
                 container={"resources": {"limits": {"nvidia.com/gpu": str(NODE_GPUS + 1)}}})
    apply(control_plane, namespace, one, greedy)
    wait_for("one-gpu to succeed", lambda: phase(control_plane, namespace, "one-gpu") == "Succeeded")
    assert _logs(node_agent, namespace, "one-gpu").strip() in [str(i) for i in range(NODE_GPUS)]

    def unschedulable():
        conds = get(control_plane, namespace, "pod", "greedy").get("status", {}).get("conditions", [])
        return next((c for c in conds if c["type"] == "PodScheduled" and c["status"] == "False"), None)

    cond = wait_for("greedy to be unschedulable", unschedulable, timeout=60)
    assert cond["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in cond.get("message", "")
    assert phase(control_plane, namespace, "greedy") == "Pending"


def test_deleting_a_job_removes_its_pods_and_processes(control_plane, node_agent, namespace):
    sleeper = template("import os, time; print('pid', os.getpid()); time.sleep(3600)")
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "sleepers"},
           "spec": {"completions": 2, "parallelism": 2, "template": sleeper}}
    apply(control_plane, namespace, job)

    def pods():
        return get(control_plane, namespace, "pods", selector="job-name=sleepers")["items"]

    def pids():
        found = [_logs(node_agent, namespace, p["metadata"]["name"]) for p in pods()]
        return [int(x.split()[1]) for x in found if x.startswith("pid")]

    running = wait_for("both job pods to run", lambda: len(pids()) == 2 and pids())
    uids = [p["metadata"]["uid"] for p in pods()]
    assert all(alive(pid) for pid in running)
    kubectl(control_plane, "delete", "job", "-n", namespace, "sleepers", "--timeout=60s")
    wait_for("the job's pods to be gone", lambda: not pods(), timeout=90)
    wait_for("the processes to exit", lambda: not any(alive(pid) for pid in running), timeout=30)
    wait_for("the pod directories to be removed",
             lambda: not any((node_agent.state_dir / "pods" / uid).exists() for uid in uids), timeout=30)


def test_restart_on_failure_and_pod_failure_policy(control_plane, node_agent, namespace, tmp_path):
    flaky = pod("flaky", f"""
        import os, sys
        if not os.path.exists("{tmp_path}/ran"):
            open("{tmp_path}/ran", "w").close()
            print("first run fails")
            sys.exit(1)
        print("second run works")
    """, restartPolicy="OnFailure")
    fatal = template("import sys; sys.exit(42)")
    rule = {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "fatal"},
           "spec": {"backoffLimit": 5, "template": fatal, "podFailurePolicy": {"rules": [rule]}}}
    apply(control_plane, namespace, flaky, job)

    wait_for("flaky to succeed", lambda: phase(control_plane, namespace, "flaky") == "Succeeded")
    status = get(control_plane, namespace, "pod", "flaky")["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert "first run fails" in kubectl(control_plane, "logs", "-n", namespace, "flaky", "--previous")
    assert "second run works" in kubectl(control_plane, "logs", "-n", namespace, "flaky")

    kubectl(control_plane, "wait", "-n", namespace, "--for=condition=Failed", "job/fatal", "--timeout=120s")
    failed = next(c for c in get(control_plane, namespace, "job", "fatal")["status"]["conditions"]
                  if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    assert len(get(control_plane, namespace, "pods", selector="job-name=fatal")["items"]) == 1  # no retry


TORCH_ALL_REDUCE = """
    import datetime, os, socket
    import torch
    import torch.distributed as dist
    rank = int(os.environ["JOB_COMPLETION_INDEX"])
    port = os.environ["MASTER_PORT"]  # TCPStore listens on every address: a free port, not a fixed one
    dist.init_process_group("gloo", init_method=f"tcp://ddp-0.ddp:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    print(socket.gethostname(), "sum", t.item())
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torch_distributed_gloo_across_pods(control_plane, node_agent, namespace):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ddp"},
               "spec": {"clusterIP": "None", "selector": {"job-name": "ddp"}}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "ddp"},
           "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                    "template": template(TORCH_ALL_REDUCE, subdomain="ddp", container={"env": [
                        {"name": "MASTER_PORT", "value": str(free_port())}]})}}
    apply(control_plane, namespace, service, job)
    kubectl(control_plane, "wait", "-n", namespace, "--for=condition=Complete", "job/ddp", "--timeout=300s")
    for p in get(control_plane, namespace, "pods", selector="job-name=ddp")["items"]:
        assert f"{p['spec']['hostname']} sum 3.0" in node_agent.logs(namespace, p["metadata"]["name"])


def test_image_map_and_variable_expansion(tmp_path):
    (tmp_path / "images.yaml").write_text(textwrap.dedent("""
        images:
          - match: "ghcr.io/kubetune/trainer*"
            path: [venv/bin]
            workingDir: work
            env: {PYTHONUNBUFFERED: "1"}
            entrypoint: [kubetune]
            args: [--help]
    """))
    rules = load_image_map(tmp_path / "images.yaml")
    trainer = resolve_image(rules, "ghcr.io/kubetune/trainer:0.1")
    assert trainer.path == [str(tmp_path / "venv" / "bin")] and trainer.working_dir == str(tmp_path / "work")
    assert (trainer.entrypoint, trainer.args) == (["kubetune"], ["--help"])
    assert trainer.env == {"PYTHONUNBUFFERED": "1"}
    other = resolve_image(rules, "busybox")
    assert other.match == "*" and other.path == [str(Path(sys.executable).parent)]
    assert resolve_image(load_image_map({"busy": {"entrypoint": ["sh"]}}), "busybox:1").entrypoint == ["sh"]
    assert expand("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"


def test_an_emptydir_over_an_ancestor_does_not_hide_the_images_files(control_plane, node_agent, namespace,
                                                                     tmp_path):
    """Like the chart's emptyDir at /tmp with a checkout under /tmp: the image map's working dir stays visible."""
    from kubetune_dev.cluster.agent_pod import ImageRule

    if not node_agent.isolate:
        pytest.skip("no private mount namespaces on this machine: volumes are not mounted at their paths")
    app = tmp_path / "app"
    app.mkdir()
    (app / "marker.txt").write_text("image file\n")
    rule = ImageRule(match="example.com/covered:*", path=[str(Path(sys.executable).parent)], working_dir=str(app))
    node_agent.image_rules.insert(0, rule)
    try:
        p = pod("covered", """
            import os
            print(open("marker.txt").read().strip(), "|", sorted(os.listdir(os.path.dirname(os.getcwd()))))
        """, container={"image": "example.com/covered:1", "volumeMounts": [{"name": "tmp",
                                                                          "mountPath": str(tmp_path)}]},
                volumes=[{"name": "tmp", "emptyDir": {}}])
        apply(control_plane, namespace, p)
        wait_for("covered to end", lambda: phase(control_plane, namespace, "covered") in ("Succeeded", "Failed"))
        out = _logs(node_agent, namespace, "covered")
        assert phase(control_plane, namespace, "covered") == "Succeeded", out
        assert out.strip() == "image file | ['app']", "the working dir is there, the rest of tmp_path is the emptyDir"
    finally:
        node_agent.image_rules.remove(rule)


def test_a_read_only_root_filesystem_leaves_only_the_volumes_writable(control_plane, node_agent, namespace):
    """readOnlyRootFilesystem: the pod's mount namespace has `/` read-only; its volumes stay writable."""
    if not node_agent.isolate:
        pytest.skip("no private mount namespaces on this machine: the root filesystem is the host's")
    p = pod("read-only", """
        import errno
        open("/scratch/ok", "w").write("written")
        try:
            open("/kubetune-read-only-probe", "w")
        except OSError as e:
            print("root:", errno.errorcode[e.errno])
        else:
            print("root: writable")
    """, container={"securityContext": {"readOnlyRootFilesystem": True},
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
            volumes=[{"name": "scratch", "emptyDir": {}}])
    apply(control_plane, namespace, p)
    wait_for("read-only to end", lambda: phase(control_plane, namespace, "read-only") in ("Succeeded", "Failed"))
    out = _logs(node_agent, namespace, "read-only")
    assert phase(control_plane, namespace, "read-only") == "Succeeded", out
    assert out.strip() == "root: EROFS"
    assert not Path("/kubetune-read-only-probe").exists()


def test_a_mount_point_is_found_through_a_symlinked_ancestor(tmp_path):
    """mountinfo names resolved paths (/run/secrets/... for /var/run/secrets/...): an agent that missed that removed
    a mount point another agent's pod still used, and detached its service-account token."""
    from kubetune_dev.cluster.agent import mounted_anywhere

    (tmp_path / "root").symlink_to("/")
    assert mounted_anywhere(tmp_path / "root" / "proc") and mounted_anywhere(Path("/proc"))
    assert not mounted_anywhere(tmp_path)
