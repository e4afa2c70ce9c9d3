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

from helpers import EVAL_SUBSET, TINY, TRAIN_SUBSET, BATCH, assert_metrics, checkpoint_progress, read_json, read_metrics, run, run_all
from subspaces.checkpoint import latest_checkpoint

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


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), *args]


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """tests/ddp_probe.py three times: 2 epochs uninterrupted; stopped by SIGTERM on rank 0 after
    update 6 (step 2 of epoch 2); that run resumed."""
    root = tmp_path_factory.mktemp("probe")
    common = ["tests/ddp_probe.py", "--epochs", "2", "--train", "256"]
    results = run_all({"ref": _torchrun(*common[:1], str(root / "ref"), *common[1:]),
                       "term": _torchrun(*common[:1], str(root / "term"), *common[1:], "--term-at", "6")})
    term = root / "term"
    stopped = {"rank0": read_json(term / "probe_rank0.json") if (term / "probe_rank0.json").exists() else None,
               "progress": checkpoint_progress(term),
               "rank_states": sorted(p.name for p in latest_checkpoint(term).glob("rank_state_*.pt")) if latest_checkpoint(term) else []}
    resumed = run(_torchrun(*common[:1], str(term), *common[1:], "--resume"))
    read = lambda name: [read_json(root / name / f"probe_rank{r}.json") for r in range(WORLD)]  # noqa: E731
    return types.SimpleNamespace(root=root, res={**results, "resumed": resumed}, read=read, stopped=stopped)


def test_two_ranks_ran(ddp_run):
    assert [r["rank"] for r in ddp_run.ranks] == list(range(WORLD))
    assert all(r["world_size"] == WORLD for r in ddp_run.ranks)
    assert sorted(p.name for p in (ddp_run.out / "ranks").iterdir()) == [f"rank{r}.json" for r in range(WORLD)]
    # the main process alone writes the run's files: one metrics line per epoch, not one per rank
    assert [m["epoch"] for m in read_metrics(ddp_run.out)] == list(range(1, EPOCHS + 1))
    assert checkpoint_progress(ddp_run.out)["updates"] == EPOCHS * TRAIN_SUBSET // (WORLD * BATCH)


def test_each_rank_trains_on_its_own_shard(ddp_run):
    seen = [r["examples_seen"] for r in ddp_run.ranks]
    assert seen == [EPOCHS * TRAIN_SUBSET // WORLD] * WORLD


def test_the_ranks_split_every_epoch_between_them(probes):
    assert probes.res["ref"].rc == 0, probes.res["ref"].explain()
    ranks = probes.read("ref")
    per_epoch = 256 // WORLD
    for epoch in range(2):
        shards = [set(r["served"][epoch * per_epoch:(epoch + 1) * per_epoch]) for r in ranks]
        assert all(len(s) == per_epoch for s in shards), "a rank saw an example twice in one epoch"
        assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(256))
    assert [r["examples_seen"] for r in ranks] == [2 * per_epoch] * WORLD


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(probes):
    """Rank 0 alone gets SIGTERM; the ranks agree at the next check, write one checkpoint together
    (a collective: a rank that went on training would hang it) and stop; torchrun then ends the job."""
    stopped = probes.stopped
    assert stopped["rank0"] and stopped["rank0"]["status"] == 75 and stopped["rank0"]["updates"] == 6, probes.res["term"].explain()
    assert "stopped: SIGTERM at epoch 2, step 2 of 4 (update 6)" in probes.res["term"].stderr
    assert stopped["progress"]["updates"] == 6 and stopped["progress"]["within_epoch"]["step"] == 2
    assert stopped["progress"]["within_epoch"]["seen"] == 2 * 32 * WORLD, "the epoch's sums so far cover both ranks"
    assert stopped["rank_states"] == [f"rank_state_{r}.pt" for r in range(WORLD)]
    assert probes.res["resumed"].rc == 0, probes.res["resumed"].explain()
    final, ref = probes.read("term"), probes.read("ref")
    assert {r["weights_sha256"] for r in final} == {ref[0]["weights_sha256"]}, "resumed weights differ from the uninterrupted run"


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

    states = [torch.load(latest_checkpoint(ddp_run.out) / f"rank_state_{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(states[0], states[1])
