"""tests/conftest.py's split of the cluster tests into shards (one control plane per shard)."""

from __future__ import annotations

from tests.conftest import CLUSTER_SECONDS, DEFAULT_S, ONE_SHARD, cluster_shards


def test_the_files_that_start_kueue_share_a_shard_and_the_shards_are_balanced():
    files = sorted([*CLUSTER_SECONDS, "tests/cluster/test_controlplane.py", "tests/security/test_new.py"])
    shard_of = cluster_shards(files, shards=3)
    assert len({shard_of[f] for f in ONE_SHARD}) == 1
    seconds = [sum(CLUSTER_SECONDS.get(f, DEFAULT_S) for f in files if shard_of[f] == s) for s in range(3)]
    longest_unit = max(max(CLUSTER_SECONDS.values()), sum(CLUSTER_SECONDS[f] for f in ONE_SHARD))
    assert max(seconds) - min(seconds) <= longest_unit, seconds


def test_one_shard_takes_everything():
    files = sorted(CLUSTER_SECONDS)
    assert set(cluster_shards(files, shards=1).values()) == {0}
