"""Distributed training on CPU: ``torchrun --nproc_per_node 2 recipes/train.py --subspace line`` (gloo).

accelerate picks the two ranks up from torchrun's environment; ``finish_run`` writes
``ranks/rank{i}.json`` per rank (its data shard's fingerprint, a digest of its final weights and
the metrics it computed), from which these tests check that the ranks split the data, ended with
the same network and report the metrics gathered over the whole evaluation set.
"""

from __future__ import annotations

import sys
import types

import pytest
import timm

from helpers import EVAL_SUBSET, SEED, TINY, TRAIN_SUBSET, BATCH, assert_metrics, read_json, read_metrics, run

WORLD = 2
EPOCHS = 1
# every rank gets whole batches: no padding, no duplicated examples
assert TRAIN_SUBSET % (WORLD * BATCH) == 0 and EVAL_SUBSET % (WORLD * BATCH) == 0


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "recipes/train.py", "--subspace", "line", *TINY, "--epochs", str(EPOCHS), "--output", str(out)]
    res = run(cmd)
    assert res.rc == 0, res.explain()
    ranks = [read_json(out / "ranks" / f"rank{r}.json") for r in range(WORLD)]
    return types.SimpleNamespace(out=out, res=res, ranks=ranks)


@pytest.fixture(scope="module")
def train_input_sum():
    """Sum of every training input of the run's subset, built as training builds it."""
    from subspaces.data import build_datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUBSPACES_OFFLINE", "1")
        mp.delenv("SUBSPACES_DATA", raising=False)
        model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
        data = build_datasets("fashion-mnist", in_chans=1, train_subset=TRAIN_SUBSET, eval_subset=EVAL_SUBSET,
                              seed=SEED, model=model)
    assert len(data.train) == TRAIN_SUBSET
    return sum(float(data.train[i][0].double().sum()) for i in range(len(data.train)))


def test_two_ranks_ran(ddp_run):
    assert [r["rank"] for r in ddp_run.ranks] == list(range(WORLD))
    assert all(r["world_size"] == WORLD for r in ddp_run.ranks)
    assert sorted(p.name for p in (ddp_run.out / "ranks").iterdir()) == [f"rank{r}.json" for r in range(WORLD)]
    # the main process alone writes the run's files: one metrics line per epoch, not one per rank
    assert [m["epoch"] for m in read_metrics(ddp_run.out)] == list(range(1, EPOCHS + 1))
    assert read_json(ddp_run.out / "checkpoint" / "progress.json")["updates"] == EPOCHS * TRAIN_SUBSET // (WORLD * BATCH)


def test_each_rank_trains_on_its_own_shard(ddp_run, train_input_sum):
    seen = [r["examples_seen"] for r in ddp_run.ranks]
    assert seen == [EPOCHS * TRAIN_SUBSET // WORLD] * WORLD
    sums = [r["input_sum"] for r in ddp_run.ranks]
    assert sums[0] != sums[1], "both ranks saw the same examples"
    assert sum(sums) == pytest.approx(EPOCHS * train_input_sum, rel=1e-9, abs=1e-6)


def test_ranks_report_the_gathered_metrics(ddp_run):
    first = ddp_run.ranks[0]["results"]
    assert set(first) == {"centre", "anchor0", "anchor1"}
    for r in ddp_run.ranks[1:]:
        assert r["results"] == first, "ranks disagree on the metrics"
    for m in first.values():
        assert_metrics(m, count=EVAL_SUBSET)   # the whole evaluation set, not one rank's half
    assert read_json(ddp_run.out / "results.json")["results"] == first


def test_ranks_end_with_the_same_weights(ddp_run):
    digests = {r["weights_sha256"] for r in ddp_run.ranks}
    assert len(digests) == 1, "the ranks ended with different weights"


def test_each_rank_checkpoints_its_own_point_generator(ddp_run):
    """accelerate saves rank 0's model only; each rank's generator (seeded per rank) is saved
    beside it, so a resumed run keeps drawing different points per rank."""
    import torch

    states = [torch.load(ddp_run.out / "checkpoint" / f"rank_state_{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(states[0], states[1])
