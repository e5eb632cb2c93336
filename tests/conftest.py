"""The whole suite's grouping for parallel runs (pytest-xdist, `--dist loadgroup`; see docs/testing.md).

- The tests marked `cluster` are split by file into CLUSTER_SHARDS xdist groups, balanced by the files' measured
  seconds. A worker runs a shard's files one after another against its own local control plane, node agent and
  S3 server (session fixtures: one each per worker, shared by every cluster test it runs). The cluster tests
  mostly wait on the API server and on pods, so three shards on two cores cut their time to a third; the files
  that start Kueue share one (ONE_SHARD).
- Every other test is grouped by its file, so a file's module and session fixtures (a tiny model, a TRL peer) are
  built on one worker, and the files spread over the workers.
- pytest-randomly shuffles the order of the files and of the tests inside each file (its seed is printed in the
  header; `--randomly-seed=N` repeats an order). The cluster tests keep their file order: the tests of a file
  share one operator and one cluster, and that is the order CI has always run them in.
"""

from __future__ import annotations

import os

import pytest

# One thread per torch process, in this process, its subprocesses and the node agent's pods (it passes the host's
# OMP_NUM_THREADS on, as a kubelet's CPU limit would bound them): five workers and their trainers share two cores,
# and with torch's default of one thread per core each process spun waiting for threads that had no core to run
# on. A tiny run took 2.6 times the CPU (docs/testing.md). Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.s3fixtures"]  # one S3 server per pytest process, for the trainer and the cluster tests

CLUSTER_SHARDS = int(os.environ.get("KUBETUNE_CLUSTER_SHARDS", "3"))
# Seconds each cluster file took in one parallel run of `make test` (KUBETUNE_TEST_CPU's wall column, 2026-12-07,
# a clean clone on a quiet machine, 1b9c075; test_dev_cluster's since its smaller demo, 4d56e81, estimated): only
# their ratios matter. A new file counts DEFAULT_S.
CLUSTER_SECONDS = {
    "tests/operator_tests/test_e2e.py": 578, "tests/operator_tests/test_sweep_e2e.py": 257,
    "tests/operator_tests/test_kueue.py": 216, "tests/chart/test_install.py": 170,
    "tests/operator_tests/test_control_loop.py": 162, "tests/operator_tests/test_preemption.py": 155,
    "tests/operator_tests/test_dev_cluster.py": 110, "tests/operator_tests/test_node_loss.py": 106,
    "tests/operator_tests/test_security.py": 102, "tests/operator_tests/test_failover.py": 83,
    "tests/operator_tests/test_kueue_live.py": 64, "tests/security/test_namespace_deletion.py": 59,
    "tests/cluster/test_agent.py": 53, "tests/operator_tests/test_policy.py": 47,
    "tests/operator_tests/test_admission.py": 44, "tests/security/test_inputs.py": 42,
    "tests/cluster/test_kueue.py": 41, "tests/security/test_leader.py": 32, "tests/cluster/test_controlplane.py": 27,
    "tests/security/test_scheduling.py": 23, "tests/security/test_pvc.py": 21, "tests/security/test_network.py": 19,
    "tests/security/test_storage_access.py": 16, "tests/security/test_sweep_admission.py": 15,
    "tests/security/test_claims.py": 11, "tests/operator_tests/test_outputs.py": 9,
}
DEFAULT_S = 60
# Files that start Kueue share a shard: every Kueue binds its metrics certificate at one host path
# (kubetune_dev.cluster.kueue.METRICS_CERTS), made and removed by whichever Kueue found it missing.
ONE_SHARD = ("tests/cluster/test_kueue.py", "tests/operator_tests/test_kueue.py",
             "tests/operator_tests/test_kueue_live.py", "tests/operator_tests/test_dev_cluster.py")


def cluster_shards(files: list[str], shards: int = CLUSTER_SHARDS) -> dict[str, int]:
    """file -> shard: the longest units first (a file, or the ONE_SHARD files together), each onto the shard
    with the fewest seconds so far."""
    together = [f for f in files if f in ONE_SHARD]
    units = [[f] for f in files if f not in ONE_SHARD] + ([together] if together else [])
    load, shard_of = [0] * max(shards, 1), {}
    for unit in sorted(units, key=lambda u: (-sum(CLUSTER_SECONDS.get(f, DEFAULT_S) for f in u), u)):
        shard = load.index(min(load))
        shard_of.update(dict.fromkeys(unit, shard))
        load[shard] += sum(CLUSTER_SECONDS.get(f, DEFAULT_S) for f in unit)
    return shard_of


def _file(item) -> str:
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Around every reordering (pytest-randomly's is a wrapper too; this one is registered later, so outside it):
    name each test's xdist group and remember the order, then put the cluster tests back in file order."""
    order = {item.nodeid: i for i, item in enumerate(items)}
    shard_of = cluster_shards(sorted({_file(i) for i in items if i.get_closest_marker("cluster")}))
    for item in items:
        cluster = item.get_closest_marker("cluster")
        item.add_marker(pytest.mark.xdist_group(f"cluster-{shard_of[_file(item)]}" if cluster else _file(item)))
    yield
    cluster = [i for i in items if i.get_closest_marker("cluster")]
    rest = [i for i in items if not i.get_closest_marker("cluster")]
    items[:] = sorted(cluster, key=lambda i: order[i.nodeid.split("@", 1)[0]]) + rest


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """KUBETUNE_TEST_CPU=FILE: append each test's CPU seconds (setup + call + teardown, of this process and of the
    child processes it reaped meanwhile: the trainer's processes, the pods of the node agent) and its wall seconds
    to FILE, one tab-separated line per test (docs/testing.md, "Where the CPU goes")."""
    path = os.environ.get("KUBETUNE_TEST_CPU")
    if not path:
        return (yield)
    import time

    cpu, wall = _cpu_seconds(), time.monotonic()
    try:
        return (yield)
    finally:
        with open(path, "a") as f:
            f.write(f"{item.nodeid}\t{_cpu_seconds() - cpu:.1f}\t{time.monotonic() - wall:.1f}\n")
