"""``samples_per_step`` S under DDP (2 gloo ranks on the CPU): one all-reduce per update.

[B]'s estimate sums the gradients of S points per batch, one backward each. The first S-1
backward passes run under ``accelerator.no_sync`` and the last one all-reduces the sum:
sum_s mean_r g_rs = mean_r sum_s g_rs, so the update is the one of a loop that all-reduces every
backward (float summation order aside), with 1 / S of the communication. With gradient
accumulation only the last backward of the last micro-batch of an update all-reduces.

tests/ddp_points_probe.py trains each variant with a DDP communication hook (torch's default
all-reduce, wrapped to record the update and the bucket of each call); "forced" variants replace
``accelerator.no_sync`` with a null context, a loop in which every backward all-reduces: the
reference for the update and for the counter.
"""

from __future__ import annotations

import sys
import types
from collections import Counter

import pytest
import torch

from helpers import read_json, run

WORLD, S, ACCUM = 2, 3, 2
STEPS = 256 // (WORLD * 32)   # batches per rank in the probe's one epoch


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("points")
    res = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "tests/ddp_points_probe.py", str(out)])
    assert res.rc == 0, res.explain()
    read = lambda name: [read_json(out / f"{name}_rank{r}.json") for r in range(WORLD)]  # noqa: E731
    load = lambda name: torch.load(out / f"{name}.pt", weights_only=True)  # noqa: E731
    return types.SimpleNamespace(out=out, read=read, load=load)


def _per_update(calls: list[list[int]]) -> dict[int, Counter]:
    """{update: Counter(bucket index -> all-reduces)} from the hook's (update, bucket) records."""
    updates: dict[int, Counter] = {}
    for update, bucket in calls:
        updates.setdefault(update, Counter())[bucket] += 1
    return updates


@pytest.mark.parametrize("name, updates", [("points", STEPS), ("accum", STEPS // ACCUM)])
def test_each_bucket_is_all_reduced_once_per_update(probe, name, updates):
    for rank in probe.read(name):
        assert rank["updates"] == updates and rank["backwards"] == S * STEPS, rank
        per_update = _per_update(rank["calls"])
        assert sorted(per_update) == list(range(1, updates + 1)), "an update without an all-reduce (or one outside an update)"
        for update, buckets in per_update.items():
            assert sorted(buckets) == list(range(len(buckets))), f"update {update}: buckets {sorted(buckets)}"
            assert set(buckets.values()) == {1}, f"rank {rank['rank']}, update {update}: all-reduces per bucket {dict(buckets)}"


@pytest.mark.parametrize("name, per_bucket", [("points_forced", S), ("accum_forced", S * ACCUM)])
def test_the_counter_sees_every_all_reduce_of_the_old_loop(probe, name, per_bucket):
    """The reference loop all-reduces every backward: the hook counts S (x accumulation) per bucket."""
    for rank in probe.read(name):
        per_update = _per_update(rank["calls"])
        for update, buckets in per_update.items():
            if update > 1:   # DDP rebuilds its buckets during the first update
                assert set(buckets.values()) == {per_bucket}, f"update {update}: {dict(buckets)}"


@pytest.mark.parametrize("name", ["points", "accum"])
def test_the_update_is_the_one_of_all_reducing_every_backward(probe, name):
    start, once, every = probe.load(f"{name}_init"), probe.load(name), probe.load(f"{name}_forced")
    assert once.keys() == every.keys() == start.keys()
    for key in once:
        moved = (every[key] - start[key]).abs().max().item()
        assert moved > 1e-3, f"{key} did not train ({moved})"
        # the same sum in another order: float32 rounding, amplified a little by a few updates
        torch.testing.assert_close(once[key], every[key], rtol=0, atol=2e-5, msg=lambda m, k=key: f"{k}: {m}")
