"""Errors of the core: every misuse raises the right exception type with a message that says what is wrong."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces.errors import ConfigError


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


class _Renamed(nn.Module):
    """Same sizes as mlp() but a different name for the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 5)
        self.act = nn.ReLU()
        self.last = nn.Linear(5, 2)


# --------------------------------------------------------------------------- points


@pytest.mark.parametrize("cls", [ss.Line, ss.Bezier, ss.PolyChain])
@pytest.mark.parametrize("t", [-0.1, 1.5, 2, math.nan, math.inf])
def test_curve_point_outside_unit_interval(cls, t):
    sub = cls(mlp()).eval()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        sub(x, point=t)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        sub.set_point(t)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        sub.export(t)


def test_curve_point_must_be_one_number():
    sub = ss.Line(mlp()).eval()
    with pytest.raises(ValueError, match="one number"):
        sub(torch.randn(2, 3), point=[0.2, 0.8])


@pytest.mark.parametrize(
    "point,fragment",
    [
        ([0.5, 0.5], "3 barycentric coordinates"),
        ([0.25, 0.25, 0.25, 0.25], "3 barycentric coordinates"),
        ([[0.2, 0.3, 0.5]], "3 barycentric coordinates"),
        ([1.2, -0.1, -0.1], "negative"),
        ([0.5, 0.5, 0.5], "sums to 1.5"),
        ([0.1, 0.1, 0.1], "not 1"),
    ],
)
def test_simplex_point_invalid(point, fragment):
    sub = ss.Simplex(mlp(), vertices=3).eval()
    with pytest.raises(ValueError, match=fragment):
        sub(torch.randn(2, 3), point=point)
    with pytest.raises(ValueError, match=fragment):
        sub.set_point(point)
    with pytest.raises(ValueError, match=fragment):
        sub.export(point)
    bn_sub = ss.Simplex(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), vertices=3)
    with pytest.raises(ValueError, match=fragment):
        ss.update_bn(bn_sub, [torch.randn(2, 3)], point=point)


@pytest.mark.parametrize("point", [[math.nan, 0.5, 0.5], [1.0, 0.0, math.nan]])
def test_simplex_point_nan(point):
    sub = ss.Simplex(mlp(), vertices=3).eval()
    with pytest.raises(ValueError, match="simplex point"):
        sub(torch.randn(2, 3), point=point)


def test_simplex_point_tolerances_accept_rounding():
    sub = ss.Simplex(mlp(), vertices=3).eval()
    out = sub(torch.randn(2, 3), point=[1 / 3, 1 / 3, 1 / 3])   # sums to 1 up to float rounding: fine
    assert out.shape == (2, 2)
    out = sub(torch.randn(2, 3), point=[1.0, 0.0, -1e-8])        # a rounding-sized negative: fine
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- construction


def test_connect_models_with_different_parameter_names():
    with pytest.raises(ValueError, match=r"'0\.weight' is in model 0 but not in model 1"):
        ss.Line.connect(mlp(), _Renamed())
    with pytest.raises(ValueError, match=r"'0\.weight' is in model 0 but not in model 2"):
        ss.Simplex.connect([mlp(1), mlp(2), _Renamed()])
    with pytest.raises(ValueError, match=r"'1\.weight' is in model 1 but not in model 0"):
        ss.Line.connect(nn.Sequential(nn.Linear(3, 5)), nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)))


def test_connect_models_with_different_shapes():
    a = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    b = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))   # other num_classes
    with pytest.raises(ValueError, match=r"'2\.weight' has shape \(2, 5\) in model 0 but \(4, 5\) in model 1"):
        ss.Bezier.connect(a, b, degree=2)
    with pytest.raises(ValueError, match=r"'2\.weight' has shape"):
        ss.PolyChain.connect(a, b)
    with pytest.raises(ValueError, match=r"'2\.weight' has shape"):
        ss.Simplex.connect([a, b], new_vertices=1)


def test_connect_timm_models_with_different_num_classes():
    import timm

    a = timm.create_model("test_resnet", num_classes=5)
    b = timm.create_model("test_resnet", num_classes=6)
    with pytest.raises(ValueError, match=r"'fc\.weight' has shape"):
        ss.Line.connect(a, b)


@pytest.mark.parametrize(
    "make,exc,fragment",
    [
        (lambda: ss.Bezier(mlp(), degree=0), ValueError, "degree=0"),
        (lambda: ss.Bezier(mlp(), degree=-2), ValueError, "degree=-2"),
        (lambda: ss.Bezier(mlp(), degree=1.5), TypeError, "degree must be an int"),
        (lambda: ss.PolyChain(mlp(), bends=-1), ValueError, "bends=-1"),
        (lambda: ss.Simplex(mlp(), vertices=1), ValueError, "vertices=1"),
        (lambda: ss.Simplex(mlp(), vertices=0), ValueError, "at least 2 vertices"),
        (lambda: ss.Simplex.connect([mlp()]), ValueError, "at least 2 vertices"),
        (lambda: ss.Simplex.connect([]), ValueError, "at least one model"),
        (lambda: ss.Simplex.connect([mlp()], new_vertices=-1), ValueError, "new_vertices=-1"),
        (lambda: ss.Line(mlp(), include=["encoder.*"]), ConfigError, "no parameter matched"),
        (lambda: ss.Line(mlp(), exclude=["*"]), ConfigError, "no parameter matched"),
        (lambda: ss.Line(mlp(), exclude="2.*"), TypeError, "list of patterns"),
        (lambda: ss.Line(mlp(), sampling="per_layer"), ConfigError, "sampling='per_layer'"),
        (lambda: ss.Simplex(mlp(), sampling="arc_length"), ConfigError, "curves"),
        (lambda: ss.Simplex.connect([mlp(1), mlp(2)], new_vertices=1, sampling="arc_length"), ConfigError, "curves"),
        (lambda: ss.Line(mlp(), init="xavier"), ConfigError, "init='xavier'"),
        (lambda: ss.Line("not a model"), TypeError, "nn.Module"),
    ],
)
def test_bad_construction(make, exc, fragment):
    with pytest.raises(exc, match=fragment):
        make()


def test_layerwise_and_arc_length_are_valid_for_curves():
    for cls in (ss.Line, ss.Bezier, ss.PolyChain):
        assert cls(mlp(), sampling="arc_length").sampling == "arc_length"
    assert ss.Simplex(mlp(), sampling="layerwise").sampling == "layerwise"


# --------------------------------------------------------------------------- anchors


@pytest.mark.parametrize("k", [2, 5, -3])
def test_anchor_index_out_of_range(k):
    sub = ss.Line(mlp())
    for fn in (sub.anchor, sub.freeze_anchor, sub.unfreeze_anchor, sub.anchor_parameters):
        with pytest.raises(IndexError, match=f"anchor {k} out of range"):
            fn(k)


def test_anchor_index_must_be_int():
    sub = ss.Simplex(mlp(), vertices=3)
    with pytest.raises(TypeError, match="must be an int"):
        sub.anchor(1.0)


def test_training_with_every_anchor_frozen():
    sub = ss.Line.connect(mlp(1), mlp(2))   # both ends frozen: nothing to train
    x = torch.randn(4, 3)
    sub.train()
    with pytest.raises(RuntimeError, match="every anchor of this subspace is frozen"):
        sub(x)
    with torch.no_grad():   # allowed: evaluation in training mode
        assert sub(x).shape == (4, 2)
    sub.eval()
    assert sub(x).shape == (4, 2)
    ss.update_bn(sub, [x], point=0.3)   # and BN recomputation
    sub.train()
    sub.unfreeze_anchor(1)
    sub(x).sum().backward()
    assert sub.anchor_parameters(1)[0].grad is not None


def test_add_vertex_then_train_is_allowed_but_frozen_simplex_is_not():
    sub = ss.Simplex.connect([mlp(1), mlp(2)])
    sub.train()
    with pytest.raises(RuntimeError, match="frozen"):
        sub(torch.randn(2, 3))
    sub.add_vertex()
    sub(torch.randn(2, 3)).sum().backward()


# --------------------------------------------------------------------------- state


def test_load_state_into_a_different_vertex_count():
    small = ss.Simplex(mlp(), vertices=3)
    big = ss.Simplex(mlp(), vertices=4)
    with pytest.raises((ValueError, RuntimeError), match="anchors"):
        big.load_state_dict(small.state_dict())
    with pytest.raises((ValueError, RuntimeError), match="anchors"):
        small.load_state_dict(big.state_dict())


def test_load_state_into_a_different_curve():
    with pytest.raises((ValueError, RuntimeError), match="anchors"):
        ss.Bezier(mlp(), degree=3).load_state_dict(ss.Line(mlp()).state_dict())


def test_load_state_of_a_different_architecture():
    other = ss.Line(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4)))
    with pytest.raises(RuntimeError, match="size mismatch"):
        ss.Line(mlp()).load_state_dict(other.state_dict())


# --------------------------------------------------------------------------- BN and regularisers


def test_update_bn_errors():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="empty loader"):
        ss.update_bn(net, [])
    with pytest.raises(ValueError, match="max_batches must be >= 1"):
        ss.update_bn(net, [torch.randn(4, 3)], max_batches=0)
    with pytest.raises(TypeError, match="point= needs a Subspace"):
        ss.update_bn(net, [torch.randn(4, 3)], point=0.5)
    with pytest.raises(KeyError, match="cannot find the input"):
        ss.update_bn(net, [{"feats": torch.randn(4, 3)}])
    with pytest.raises(TypeError, match="unsupported batch type"):
        ss.update_bn(net, [3.0])
    with pytest.raises(ValueError, match="outside"):
        ss.update_bn(ss.Line(net), [torch.randn(4, 3)], point=1.2)


def test_update_bn_validates_point_on_models_without_bn():
    with pytest.raises(TypeError, match="point= needs a Subspace"):
        ss.update_bn(mlp(), [torch.randn(4, 3)], point=0.5)
    with pytest.raises(ValueError, match="outside"):
        ss.update_bn(ss.Line(mlp()), [torch.randn(4, 3)], point=1.2)


def test_regulariser_errors():
    sub = ss.Simplex(mlp(), vertices=3)
    with pytest.raises(ValueError, match="two different anchors"):
        ss.cosine_penalty(sub, pair=(1, 1))
    with pytest.raises(IndexError, match="out of range"):
        ss.cosine_penalty(sub, pair=(0, 3))
