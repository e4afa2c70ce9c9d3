"""FGE, SSE and SWA on the Trainer (subspaces.snapshots) and ensembles of subspace points.

In-process and tiny: test_resnet on 64 Fashion-MNIST training images, batch 16 (4 updates per epoch).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch import nn

import subspaces as ss
from subspaces.errors import ConfigError
from subspaces.data import build_datasets, make_loader
from subspaces.ensembles import Ensemble, subspace_ensemble, subspace_points
from subspaces.io import load_model, save_model
from subspaces.schedules import fge_lr, sse_lr
from subspaces.snapshots import (
    cycle_iterations,
    find_pretrained,
    list_snapshots,
    load_optimizer_state,
    swa_average,
    train_snapshots,
    updates_per_epoch,
    validate_cycle,
)
from subspaces.run_folder import make_accelerator
from subspaces.training import Trainer

BATCH, TRAIN, EVAL = 16, 64, 32
UPE = TRAIN // BATCH


def make_args(tmp, **overrides) -> ss.TrainRunConfig:
    settings = dict(model="test_resnet", batch_size=BATCH, bn_batches=2, log_interval=1000, output=str(tmp))
    return ss.TrainRunConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def bundle():
    data = build_datasets("fashion-mnist", train_subset=TRAIN, eval_subset=EVAL, seed=0)
    spec = {"model": "test_resnet", "num_classes": 10, "in_chans": 1, "model_kwargs": {}, "img_size": 28,
            "mean": list(data.mean), "std": list(data.std), "dataset": "fashion-mnist"}
    return data, spec


def fresh_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1)


class StepRecorder:
    """Records, at every optimiser step (any optimiser), the lr of every group and, once, the state."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.first_state: dict | None = None

    def __enter__(self):
        def hook(optimizer, args, kwargs):
            self.lrs.append([g["lr"] for g in optimizer.param_groups])
            if self.first_state is None:
                self.first_state = copy.deepcopy(optimizer.state_dict()["state"])

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def fge_run(tmp_path_factory, bundle):
    """A 2-epoch standard run (the pre-training), then FGE for 3 epochs with a cycle of 4 iterations."""
    data, spec = bundle
    root = tmp_path_factory.mktemp("fge")
    pre = root / "pre"
    pre.mkdir()
    args = make_args(pre, epochs=2, output=str(pre))
    trainer = Trainer(args, fresh_model(0), data, spec, make_accelerator(args), pre)
    trainer.fit()
    save_model(trainer.unwrapped, pre / "model", spec)
    model_path, opt_path = find_pretrained(pre)
    fge_args = make_args(root / "fge", epochs=3, output=str(root / "fge"), seed=3)
    with StepRecorder() as rec:
        res = train_snapshots("fge", fge_args, load_model(model_path), data, spec, root / "fge", cycle=4, lr_max=0.05, lr_min=0.001,
                              optimizer_state=opt_path)
    return {"root": root, "res": res, "rec": rec, "opt_path": opt_path, "data": data, "args": fge_args}


def test_fge_applies_the_formula_per_update_and_snapshots_at_half_cycles(fge_run):
    res, rec = fge_run["res"], fge_run["rec"]
    assert res["finished"]
    n = 3 * UPE
    assert len(rec.lrs) == n
    expected = [fge_lr(i, 4, 0.05, 0.001) for i in range(1, n + 1)]
    for i, groups in enumerate(rec.lrs):
        assert len(groups) == 2  # decay / no-decay groups, the same lr
        for lr in groups:
            assert lr == pytest.approx(expected[i], abs=1e-12), f"update {i + 1}"
    assert [s.iteration for s in list_snapshots(fge_run["root"] / "fge")] == [i for i in range(1, n + 1) if i % 4 == 2] == [2, 6, 10]
    assert (fge_run["root"] / "fge" / "snapshots.json").exists()


def test_fge_starts_from_the_saved_momentum(fge_run):
    saved = torch.load(fge_run["opt_path"], weights_only=True)["state"]
    first = fge_run["rec"].first_state
    assert "loaded the optimiser state" in fge_run["res"]["optimizer"]
    assert set(first) == set(saved) and len(saved) > 0
    for i in saved:
        torch.testing.assert_close(first[i]["momentum_buffer"], saved[i]["momentum_buffer"], rtol=0, atol=0)


def test_snapshots_are_plain_models_with_their_own_batchnorm(fge_run):
    data, args = fge_run["data"], fge_run["args"]
    snap = load_model(list_snapshots(fge_run["root"] / "fge")[1].path)
    again = copy.deepcopy(snap)
    ss.update_bn(again, make_loader(data.bn, args.batch_size, shuffle=False), max_batches=args.bn_batches)
    for (name, a), (_, b) in zip(snap.named_buffers(), again.named_buffers()):
        if "running" in name:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_swa_is_the_mean_of_the_snapshots(fge_run):
    data, args = fge_run["data"], fge_run["args"]
    paths = [s.path for s in list_snapshots(fge_run["root"] / "fge")]
    models = [load_model(p) for p in paths]
    bn = make_loader(data.bn, args.batch_size, shuffle=False)
    swa = swa_average(paths, bn, args.bn_batches)
    for name, p in swa.named_parameters():
        mean = torch.stack([dict(m.named_parameters())[name].detach() for m in models]).mean(0)
        torch.testing.assert_close(p.detach(), mean, rtol=1e-5, atol=1e-6)
    assert not torch.equal(dict(swa.named_parameters())["fc.weight"], dict(models[-1].named_parameters())["fc.weight"])
    again = copy.deepcopy(swa)
    ss.update_bn(again, bn, max_batches=args.bn_batches)
    torch.testing.assert_close(swa.bn1.running_mean, again.bn1.running_mean)


def test_sse_schedule_and_snapshots(tmp_path, bundle):
    data, spec = bundle
    args = make_args(tmp_path, epochs=3, output=str(tmp_path), seed=5)
    with StepRecorder() as rec:
        res = train_snapshots("sse", args, fresh_model(1), data, spec, tmp_path, cycle=5, lr_max=0.1)
    assert [s.iteration for s in res["snapshots"]] == [5, 10]
    assert [g[0] for g in rec.lrs] == pytest.approx([sse_lr(i, 5, 0.1) for i in range(1, 3 * UPE + 1)], abs=1e-12)


def test_optimizer_state_of_another_model_is_not_loaded(tmp_path, fge_run):
    other = nn.Linear(3, 2)
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    msg = load_optimizer_state(opt, fge_run["opt_path"])
    assert "not loaded" in msg and not opt.state
    assert "momentum buffers start at zero" in load_optimizer_state(opt, None)


def test_cycle_validation():
    assert cycle_iterations("fge", 10, cycle_epochs=2) == 20
    assert cycle_iterations("fge", 10, cycle_iters=6) == 6
    with pytest.raises(ConfigError, match="even"):
        cycle_iterations("fge", 10, cycle_iters=7)
    with pytest.raises(ConfigError, match="even"):
        cycle_iterations("fge", 5, cycle_epochs=1)   # 5 iterations
    assert cycle_iterations("sse", 5, cycle_epochs=1) == 5
    with pytest.raises(ConfigError, match="longer than the run"):
        validate_cycle("fge", 40, 30)
    with pytest.raises(ConfigError, match="less than one cycle"):
        validate_cycle("fge", 4, 100, budget_iters=3)
    assert updates_per_epoch(100, 32) == 4 and updates_per_epoch(100, 32, num_processes=2) == 2


def test_subspace_point_ensemble_averages_probabilities(bundle):
    data, _ = bundle
    line = ss.Line(fresh_model(2), seed=0)
    bn = make_loader(data.bn, BATCH, shuffle=False)
    points = subspace_points(line, "even", 3)
    assert [float(t) for t in points] == [0.0, 0.5, 1.0]
    ens = subspace_ensemble(line, points, bn_loader=bn, bn_batches=2)
    assert isinstance(ens, Ensemble) and len(ens) == 3
    x = torch.stack([data.eval[i][0] for i in range(8)])
    members = [line.export(t, bn_loader=bn, bn_batches=2).eval() for t in points]
    with torch.no_grad():
        logits = [m(x) for m in members]
        probs = ens(x)
    torch.testing.assert_close(probs, torch.stack([l.softmax(-1) for l in logits]).mean(0), rtol=1e-5, atol=1e-6)
    logit_avg = torch.stack(logits).mean(0).softmax(-1)
    assert (probs - logit_avg).abs().max() > 1e-4
    # every member's BatchNorm is its own point's, not the shared training statistics
    assert not torch.allclose(members[0].bn1.running_mean, members[2].bn1.running_mean)


def test_subspace_points_modes():
    simplex = ss.Simplex(nn.Linear(3, 2), vertices=3, seed=0)
    ends = subspace_points(simplex, "ends")
    assert torch.equal(torch.stack(ends), torch.eye(3))
    draws = torch.stack(subspace_points(simplex, "random", 4))
    assert draws.shape == (4, 3) and torch.allclose(draws.sum(-1), torch.ones(4)) and (draws >= 0).all()
    with pytest.raises(ValueError, match="curves"):
        subspace_points(simplex, "even", 3)
    line = ss.Line(nn.Linear(3, 2), seed=0)
    assert [float(t) for t in subspace_points(line, "ends")] == [0.0, 1.0]
    assert float(subspace_points(line, "centre")[0]) == 0.5
