"""Per-layer optimiser groups: the per-parameter anchor layout, timm's weight-decay and
layer-decay rules through ``create_optimizer_v2`` / ``Subspace.param_groups``, and ``layout_for``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import subspaces as ss
from subspaces.errors import ConfigError
from subspaces.io import load_subspace, save_subspace
from subspaces.subspace import layout_for


def _model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=5, **kwargs)


def _batch(model: torch.nn.Module, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *model.pretrained_cfg["input_size"], generator=g), torch.randint(0, 5, (n,), generator=g)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _one_step_gap(layout: str, opt_name: str) -> float:
    """Largest weight difference after one ``opt_name`` step on a line at t = 1 (anchor 0 frozen,
    so w = W_1 and dL/dW_1 = dL/dw exactly) against the same step on the plain model at W_1."""
    line = ss.Line.connect(_model("test_resnet", 0), _model("test_resnet", 1), layout=layout)
    line.unfreeze_anchor(1)
    line.set_point(1.0)
    plain = line.export(1.0)
    x, y = _batch(plain)
    kwargs = dict(lr=0.05, weight_decay=0.05)
    _step(line, create_optimizer_v2(line, opt_name, **kwargs), x, y)
    _step(plain, create_optimizer_v2(plain, opt_name, **kwargs), x, y)
    after = dict(line.export(1.0).named_parameters())
    return max(float((after[n] - p).detach().abs().max()) for n, p in plain.named_parameters())


@pytest.mark.parametrize("opt_name", ["lamb", "lars"])
def test_per_tensor_step_equals_plain_model(opt_name):
    # per parameter the trust ratio ||w|| / ||update|| is each layer's own: the same step as the plain model
    assert _one_step_gap("per_parameter", opt_name) < 1e-6
    # flat chunks share one trust ratio across layers: the step differs (what the layout fixes)
    assert _one_step_gap("flat", opt_name) > 1e-4


def test_per_parameter_layout_stores_original_shapes_and_mixes_like_flat():
    a, b = _model("test_vit", 0, img_size=32), _model("test_vit", 1, img_size=32)
    flat = ss.Line.connect(a, b, layout="flat")
    per = ss.Line.connect(a, b, layout="per_parameter")
    names = per.parameter_origins()
    shapes = dict(a.named_parameters())
    params = dict(per.named_parameters())
    for name, origin in names.items():
        assert len(origin) == 1 and params[name].shape == shapes[origin[0]].shape
    for sub in (flat, per):
        sub.unfreeze_anchor(1)
    x, _ = _batch(a)
    for t in (0.0, 0.3, 1.0):
        assert torch.equal(flat.eval()(x, point=t), per.eval()(x, point=t))
    # training mode: gradients reach each per-parameter anchor as c_k dL/dw
    per.train()
    per(x, point=0.25).sum().backward()
    flat.train()
    flat(x, point=0.25).sum().backward()
    assert _grads_by_name(per, 1).keys() == _grads_by_name(flat, 1).keys()
    for name, g in _grads_by_name(per, 1).items():
        assert torch.allclose(g, _grads_by_name(flat, 1)[name], atol=1e-7), name


def _grads_by_name(sub: ss.Subspace, k: int) -> dict[str, torch.Tensor]:
    """Anchor k's gradient per wrapped-model parameter name, whatever the layout."""
    shapes = {n: s for n, s in zip(sub.subspace_parameter_names(), _shapes(sub))}
    params = dict(sub.named_parameters())
    out = {}
    for name, origin in sub.parameter_origins().items():
        if name.startswith(f"anchors.{k}."):
            pieces = params[name].grad.reshape(-1).split([shapes[o].numel() for o in origin])
            out.update({o: piece.view(shapes[o]) for o, piece in zip(origin, pieces)})
    return out


def _shapes(sub: ss.Subspace) -> list[torch.Size]:
    plain = dict(sub.export().named_parameters())
    return [plain[n].shape for n in sub.subspace_parameter_names()]


def test_per_parameter_round_trips_and_grows(tmp_path):
    sub = ss.Simplex(_model("test_resnet"), vertices=2, seed=0, layout="per_parameter")
    spec = {"model": "test_resnet", "num_classes": 5, "in_chans": 3, "model_kwargs": {}}
    back = load_subspace(save_subspace(sub, tmp_path / "sub", spec))
    assert back.layout == "per_parameter"
    x, _ = _batch(sub.model)
    assert torch.equal(back.eval()(x), sub.eval()(x))
    k = sub.add_vertex()
    assert [p.shape for p in sub.anchor_parameters(k)] == [p.shape for p in sub.anchor_parameters(0)]


def _scales(opt: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}


def test_layer_decay_gives_each_block_its_own_lr():
    net = _model("test_vit", img_size=32)
    sub = ss.Line(net, seed=0, layout="per_parameter")
    opt = create_optimizer_v2(sub, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    ref = create_optimizer_v2(net, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    plain_scale = {n: _scales(ref)[id(p)] for n, p in net.named_parameters()}
    params = dict(sub.named_parameters())
    by_block: dict[str, set[float]] = {}
    for name, origin in sub.parameter_origins().items():
        scale = _scales(opt)[id(params[name])]
        assert scale == pytest.approx(plain_scale[origin[0]])   # the plain model's layer-decay scale
        if origin[0].startswith("blocks."):
            by_block.setdefault(origin[0].split(".")[1], set()).add(scale)
    assert len(by_block) == len(net.blocks) and all(len(s) == 1 for s in by_block.values())
    per_block = [by_block[str(i)].pop() for i in range(len(net.blocks))]
    assert per_block == sorted(set(per_block))   # distinct, rising towards the head
    assert per_block[-1] < 1.0   # the head (the last layer) keeps the full lr
    # timm's schedulers apply lr_scale: after a step, each block trains at its own lr
    sched, _ = timm.scheduler.create_scheduler_v2(opt, "cosine", num_epochs=2, warmup_epochs=0)
    sched.step(0)
    assert len({g["lr"] for g in opt.param_groups}) == len(set(plain_scale.values()))


def test_layer_decay_needs_per_parameter_layout():
    sub = ss.Line(_model("test_vit", img_size=32), seed=0)   # flat chunks span layers
    with pytest.raises(ConfigError, match="per_parameter"):
        create_optimizer_v2(sub, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)


@pytest.mark.parametrize("layout, layer_decay", [("flat", None), ("per_parameter", None), ("per_parameter", 0.75)])
def test_no_weight_decay_names_get_no_decay(layout, layer_decay):
    net = _model("test_vit", img_size=32)
    assert {"pos_embed", "cls_token"} <= set(net.no_weight_decay())
    sub = ss.Line(net, seed=0, layout=layout, exclude=["head.*"])   # head: shared parameters
    groups = sub.param_groups(0.05, layer_decay=layer_decay)
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(sub.named_parameters())
    seen = set()
    for name, origin in sub.parameter_origins().items():
        exempt = {o in ("pos_embed", "cls_token") or o.endswith(".bias") or dict(net.named_parameters())[o].ndim <= 1 for o in origin}
        assert len(exempt) == 1
        assert wd[id(params[name])] == (0.0 if exempt.pop() else 0.05), name
        seen.update(origin)
    assert {"pos_embed", "cls_token", "head.weight", "head.bias"} <= seen
    # create_optimizer_v2 with param_group_fn gives the same groups
    opt = create_optimizer_v2(sub, "lamb", lr=1e-3, weight_decay=0.05, param_group_fn=lambda m: m.param_groups(0.05, layer_decay))
    assert {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]} == wd


def test_layout_for_and_bad_layout():
    assert layout_for("sgd") == layout_for("adamw") == layout_for("momentum") == "flat"
    for opt in ("lamb", "lambc", "lars", "nlars", "adafactor", "lookahead_lamb", "fusedlamb", "muon"):
        assert layout_for(opt) == "per_parameter", opt
    assert layout_for("sgd", layer_decay=0.75) == "per_parameter"
    with pytest.raises(ConfigError):
        layout_for("")
    with pytest.raises(ConfigError, match="layout"):
        ss.Line(_model("test_resnet"), layout="per_layer")
    with pytest.raises(ConfigError, match="layer_decay"):
        ss.Line(_model("test_resnet"), layout="per_parameter").param_groups(0.05, layer_decay=1.5)


def test_layer_decay_without_group_matcher_follows_timms_fallback():
    # timm groups a model without group_matcher() 12 trunk tensors to a layer, then the classifier head
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])
    net.pretrained_cfg = {"classifier": "19"}
    sub = ss.Line(net, seed=0, layout="per_parameter")
    ref = create_optimizer_v2(net, "sgd", lr=0.1, weight_decay=0.0, layer_decay=0.5)
    opt = create_optimizer_v2(sub, "sgd", lr=0.1, weight_decay=0.0, layer_decay=0.5)
    plain_scale = {n: _scales(ref)[id(p)] for n, p in net.named_parameters()}
    params = dict(sub.named_parameters())
    for name, origin in sub.parameter_origins().items():
        assert _scales(opt)[id(params[name])] == plain_scale[origin[0]], name
    assert len(set(plain_scale.values())) == 5   # 38 trunk tensors in 4 layers, and the head


def test_connect_and_fge_default_to_plain_momentum_sgd():
    # [G] fitted curves and ran FGE with torch's SGD(momentum=0.9), not Nesterov (timm's "sgd")
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for recipe, expected in (("connect.py", "momentum"), ("fge.py", "momentum"), ("train.py", "sgd")):
        text = " ".join(subprocess.run([sys.executable, str(recipes / recipe), "--help"], capture_output=True, text=True).stdout.split())
        assert re.search(r"--opt OPT timm optimiser name: .*?\(default: (\w+)", text).group(1) == expected, recipe
    net = timm.create_model("test_resnet", num_classes=3)
    assert create_optimizer_v2(net, "momentum", lr=0.1, momentum=0.9).param_groups[0]["nesterov"] is False
    assert create_optimizer_v2(net, "sgd", lr=0.1, momentum=0.9).param_groups[0]["nesterov"] is True
