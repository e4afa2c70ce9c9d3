"""Tests of the core: shapes, forward/points, anchors, export, state, sampling, BN, regularisers,
optimiser grouping, parameter coverage, autocast and torch.compile (docs/science.md §1, §2, §4, §5)."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn
from torch.optim.swa_utils import update_bn as torch_update_bn

import subspaces as ss

TIMM_TEST_MODELS = ("test_resnet", "test_vit", "test_convnext", "test_efficientnet")

# --------------------------------------------------------------------------- helpers


def build(shape: str, model: nn.Module, **kwargs) -> ss.Subspace:
    if shape == "line":
        return ss.Line(model, **kwargs)
    if shape == "bezier":
        return ss.Bezier(model, degree=2, **kwargs)
    if shape == "polychain":
        return ss.PolyChain(model, bends=1, **kwargs)
    if shape == "simplex":
        return ss.Simplex(model, vertices=3, **kwargs)
    raise AssertionError(shape)


def anchor_point(sub: ss.Subspace, k: int):
    """The point at which the shape passes through anchor k (curves: ends and chain bends)."""
    K = sub.num_anchors
    if isinstance(sub, ss.Simplex):
        p = torch.zeros(K)
        p[k] = 1.0
        return p
    return k / (K - 1)


def vec_net(n: int) -> nn.Module:
    """A model whose only parameter is a (1, n) weight: the subspace is R^n, one flat group."""
    return nn.Linear(n, 1, bias=False)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def anchor_slices(sub: ss.Subspace, k: int, attr: str = "data") -> dict[str, torch.Tensor]:
    """Per-parameter views of anchor k's flat storage (or of its .grad with attr='grad')."""
    out = {}
    for g in sub._groups:
        flat = getattr(sub.anchors[k][g.name], attr)
        if flat is None:
            continue
        for name, piece, shape in zip(g.names, torch.split(flat.reshape(-1), g.numels), g.shapes):
            out[name] = piece.view(shape)
    return out


# --------------------------------------------------------------------------- anchors are on the shape


@pytest.mark.parametrize("shape", ["line", "bezier", "polychain", "simplex"])
@pytest.mark.parametrize("name", TIMM_TEST_MODELS)
def test_output_at_anchor_point_equals_anchor_model(name, shape, make_timm, timm_input):
    model = make_timm(name)
    x = timm_input(model)
    sub = build(shape, model, seed=0).eval()
    # a Bezier curve passes through its end anchors only; chains and simplexes through all
    on_shape = [0, sub.num_anchors - 1] if shape == "bezier" else range(sub.num_anchors)
    outs = []
    with torch.no_grad():
        for k in on_shape:
            plain = sub.anchor(k)
            assert type(plain) is type(model)
            got = sub(x, point=anchor_point(sub, k))
            assert_close(got, plain.eval()(x))
            outs.append(got)
    # the anchors are different networks, so the check above is not vacuous
    assert not torch.allclose(outs[0], outs[-1], atol=1e-4)


def test_resnet18_small_input_anchor_and_export(make_timm):
    model = make_timm("resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sub = ss.Bezier(model, degree=2, seed=0).eval()
    with torch.no_grad():
        assert_close(sub(x, point=1.0), sub.anchor(2).eval()(x))
        exported = sub.export(0.3)
        fresh = timm.create_model("resnet18", num_classes=10)
        fresh.load_state_dict(exported.state_dict(), strict=True)
        assert_close(fresh.eval()(x), sub(x, point=0.3))


# --------------------------------------------------------------------------- coefficients


def _closed_form(shape: str, K: int, p: torch.Tensor) -> torch.Tensor:
    if shape == "bezier":
        n = K - 1
        return torch.stack([math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(K)], -1)
    if shape == "polychain":
        return torch.stack([torch.clamp(1 - (p * (K - 1) - k).abs(), min=0) for k in range(K)], -1)
    return p


@pytest.mark.parametrize(
    "shape,ctor,K",
    [
        ("bezier", lambda m: ss.Line(m), 2),
        ("bezier", lambda m: ss.Bezier(m, degree=1), 2),
        ("bezier", lambda m: ss.Bezier(m, degree=2), 3),
        ("bezier", lambda m: ss.Bezier(m, degree=4), 5),
        ("polychain", lambda m: ss.PolyChain(m, bends=0), 2),
        ("polychain", lambda m: ss.PolyChain(m, bends=1), 3),
        ("polychain", lambda m: ss.PolyChain(m, bends=3), 5),
        ("simplex", lambda m: ss.Simplex(m, vertices=2), 2),
        ("simplex", lambda m: ss.Simplex(m, vertices=3), 3),
        ("simplex", lambda m: ss.Simplex(m, vertices=5), 5),
    ],
)
def test_coefficients_closed_forms_and_partition_of_unity(shape, ctor, K):
    sub = ctor(vec_net(2))
    assert sub.num_anchors == K
    gen = torch.Generator().manual_seed(1)
    pts = sub.sample(gen, n=64)
    if shape != "simplex":
        pts = torch.cat([pts, torch.tensor([0.0, 1.0]), torch.arange(K) / (K - 1)])
    c = sub.coefficients(pts)
    assert c.shape == (pts.shape[0], K)
    torch.testing.assert_close(c, _closed_form(shape, K, pts), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c.sum(-1), torch.ones(pts.shape[0]), atol=1e-6, rtol=0)
    assert (c >= -1e-7).all()
    # one point at a time gives the same as the batch
    torch.testing.assert_close(sub.coefficients(pts[3]), c[3])
    if shape == "line" or (shape == "bezier" and K == 2):
        torch.testing.assert_close(sub.coefficients(0.25), torch.tensor([0.75, 0.25]))
    if shape == "polychain":   # one-hot at the bends
        torch.testing.assert_close(sub.coefficients(torch.arange(K) / (K - 1)), torch.eye(K), atol=1e-6, rtol=0)


def _set_interior(sub, k, value):
    with torch.no_grad():
        for p, v in zip(sub.anchor_parameters(k), value):
            p.copy_(v)


def test_bezier2_and_chain1_follow_garipov_formulas():
    w1, w2 = mlp(1), mlp(2)
    P1, P2 = params_of(w1), params_of(w2)
    for cls, kwargs in ((ss.Bezier, {"degree": 2}), (ss.PolyChain, {"bends": 1})):
        sub = cls.connect(w1, w2, **kwargs)
        gen = torch.Generator().manual_seed(0)
        theta_flat = [torch.randn(p.shape, generator=gen) for p in sub.anchor_parameters(1)]
        _set_interior(sub, 1, theta_flat)
        theta = anchor_slices(sub, 1)
        for t in (0.0, 0.1, 0.3, 0.5, 0.62, 0.9, 1.0):
            got = params_of(sub.export(t))
            for n in P1:
                if cls is ss.Bezier:
                    want = (1 - t) ** 2 * P1[n] + 2 * t * (1 - t) * theta[n] + t**2 * P2[n]
                elif t <= 0.5:
                    want = 2 * (t * theta[n] + (0.5 - t) * P1[n])
                else:
                    want = 2 * ((t - 0.5) * P2[n] + (1 - t) * theta[n])
                torch.testing.assert_close(got[n], want, atol=1e-6, rtol=1e-6, msg=f"{cls.__name__} t={t} {n}")


@pytest.mark.parametrize(
    "ctor",
    [
        lambda a, b: ss.Line.connect(a, b),
        lambda a, b: ss.Bezier.connect(a, b, degree=2),
        lambda a, b: ss.Bezier.connect(a, b, degree=3),
        lambda a, b: ss.PolyChain.connect(a, b, bends=1),
        lambda a, b: ss.PolyChain.connect(a, b, bends=3),
    ],
)
def test_connect_starts_on_the_segment_with_frozen_ends(ctor):
    a, b = mlp(1), mlp(2)
    A, B = params_of(a), params_of(b)
    sub = ctor(a, b)
    K = sub.num_anchors
    assert not sub.anchor_trainable(0) and not sub.anchor_trainable(K - 1)
    assert all(sub.anchor_trainable(k) for k in range(1, K - 1))
    for t in torch.linspace(0, 1, 11).tolist() + [0.123, 0.777]:
        got = params_of(sub.export(t))
        for n in A:
            torch.testing.assert_close(got[n], (1 - t) * A[n] + t * B[n], atol=1e-6, rtol=1e-6)
    # the ends are copies (to rounding: see the exact test below), the originals are untouched
    for n in A:
        torch.testing.assert_close(anchor_slices(sub, 0)[n], A[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(anchor_slices(sub, K - 1)[n], B[n], atol=1e-6, rtol=0)
        assert torch.equal(dict(a.named_parameters())[n], A[n])
        assert torch.equal(dict(b.named_parameters())[n], B[n])


@pytest.mark.parametrize("cls", [ss.Line, ss.Bezier, ss.PolyChain])
def test_connect_ends_are_exact_copies(cls):
    a, b = mlp(1), mlp(2)
    sub = cls.connect(a, b)
    K = sub.num_anchors
    for n, p in a.named_parameters():
        assert torch.equal(anchor_slices(sub, 0)[n], p.detach()), n
    for n, p in b.named_parameters():
        assert torch.equal(anchor_slices(sub, K - 1)[n], p.detach()), n


def test_connect_timm_models_ends_reproduce_the_networks(make_timm, timm_input):
    a, b = make_timm("test_resnet", seed=1), make_timm("test_resnet", seed=2)
    x = timm_input(a)
    sub = ss.Bezier.connect(a, b, degree=2).eval()
    with torch.no_grad():
        assert_close(sub(x, point=0.0), a.eval()(x))
        assert_close(sub(x, point=1.0), b.eval()(x))   # fresh BN buffers are identical in a and b


def test_simplex_connect_new_vertices_at_centroid():
    models = [mlp(s) for s in (1, 2, 3)]
    sub = ss.Simplex.connect(models, new_vertices=2)
    assert sub.num_anchors == 5
    assert [sub.anchor_trainable(k) for k in range(5)] == [False, False, False, True, True]
    P = [params_of(m) for m in models]
    for k in (3, 4):
        for n, v in anchor_slices(sub, k).items():
            torch.testing.assert_close(v, (P[0][n] + P[1][n] + P[2][n]) / 3, atol=1e-6, rtol=1e-6)
    for k in range(3):
        for n, v in anchor_slices(sub, k).items():
            assert torch.equal(v, P[k][n])


def test_add_vertex_spro_step():
    sub = ss.Simplex.connect([mlp(1)], new_vertices=1)
    assert [sub.anchor_trainable(k) for k in range(2)] == [False, True]
    _set_interior(sub, 1, [torch.randn(p.shape) for p in sub.anchor_parameters(1)])
    before = [anchor_slices(sub, k) for k in range(2)]
    new = sub.add_vertex()
    assert new == 2 and sub.num_anchors == 3
    assert [sub.anchor_trainable(k) for k in range(3)] == [False, False, True]
    for n, v in anchor_slices(sub, 2).items():
        torch.testing.assert_close(v, (before[0][n] + before[1][n]) / 2)
    assert "anchors.2.decay_float32_0" in sub.state_dict()
    # a training step reaches the new vertex only
    sub.train()
    sub(torch.randn(4, 3)).square().mean().backward()
    assert all(p.grad is None for k in (0, 1) for p in sub.anchor_parameters(k))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sub.anchor_parameters(2))
    x = torch.randn(4, 3)
    sub.eval()
    with torch.no_grad():
        assert_close(sub(x, point=[0.0, 0.0, 1.0]), sub(x, point=[0.5, 0.5, 0.0]))


# --------------------------------------------------------------------------- points in forward


def _line01(**kwargs) -> ss.Line:
    """Line on a 1-weight model with W0 = 0 and W1 = 1: sub(ones) returns t."""
    sub = ss.Line(vec_net(1), **kwargs)
    with torch.no_grad():
        sub.anchor_parameters(0)[0].fill_(0.0)
        sub.anchor_parameters(1)[0].fill_(1.0)
    return sub


def test_point_precedence_and_modes():
    one = torch.ones(1, 1)
    sub = _line01(seed=0)
    sub.eval()
    assert sub(one).item() == pytest.approx(0.5)                # eval: centre
    assert sub(one, point=0.2).item() == pytest.approx(0.2)     # explicit point
    sub.set_point(0.7)
    assert sub(one).item() == pytest.approx(0.7)                # fixed point, eval
    assert sub(one, point=0.1).item() == pytest.approx(0.1)     # explicit wins over fixed
    sub.train()
    assert sub(one).item() == pytest.approx(0.7)                # fixed point, train
    with sub.at(0.3):
        assert sub(one).item() == pytest.approx(0.3)
        assert sub(one, point=0.9).item() == pytest.approx(0.9)
    assert sub(one).item() == pytest.approx(0.7)                # at() restores the fixed point
    sub.set_point(None)
    draws = [sub(one).item() for _ in range(20)]                # train: a fresh point per forward
    assert len(set(draws)) == 20 and all(0 <= d <= 1 for d in draws)
    sub.eval()
    assert sub(one).item() == pytest.approx(0.5)


def test_simplex_eval_centre_and_explicit_point(set_anchor):
    sub = ss.Simplex(vec_net(1), vertices=3).eval()
    for k, v in enumerate((0.0, 3.0, 6.0)):
        set_anchor(sub, k, [v])
    one = torch.ones(1, 1)
    assert sub(one).item() == pytest.approx(3.0)                # centroid
    assert sub(one, point=[0.5, 0.5, 0.0]).item() == pytest.approx(1.5)
    assert sub(one, point=torch.tensor([0.0, 0.0, 1.0])).item() == pytest.approx(6.0)


def test_training_draws_come_from_the_seeded_generator():
    one = torch.ones(1, 1)
    a, b, c = _line01(seed=7), _line01(seed=7), _line01(seed=8)
    for s in (a, b, c):
        s.train()
    da = [a(one).item() for _ in range(5)]
    db = [b(one).item() for _ in range(5)]
    dc = [c(one).item() for _ in range(5)]
    assert da == pytest.approx(db) and da != pytest.approx(dc)
    # and the draws are sub.sample(sub.generator)
    ref = _line01(seed=7)
    expected = [ref.sample(ref.generator).item() for _ in range(5)]
    assert da == pytest.approx(expected, abs=1e-6)


def test_sample_distributions():
    gen = torch.Generator().manual_seed(0)
    line = ss.Line(vec_net(1))
    t = line.sample(gen, n=20000)
    assert t.shape == (20000,) and line.sample(gen).shape == ()
    assert 0 <= t.min() and t.max() <= 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t.var().item() == pytest.approx(1 / 12, abs=0.003)
    simplex = ss.Simplex(vec_net(1), vertices=3)
    p = simplex.sample(gen, n=20000)
    assert p.shape == (20000, 3) and simplex.sample(gen).shape == (3,)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(20000))
    # Dirichlet(1,1,1): each marginal is Beta(1, 2): mean 1/3, variance 1/18
    torch.testing.assert_close(p.mean(0), torch.full((3,), 1 / 3), atol=0.01, rtol=0)
    torch.testing.assert_close(p.var(0), torch.full((3,), 1 / 18), atol=0.003, rtol=0)
    # P(p_0 > 1/2) = (1/2)^2 under the uniform distribution on the triangle
    assert (p[:, 0] > 0.5).float().mean().item() == pytest.approx(0.25, abs=0.015)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(simplex.sample(g1, n=4), simplex.sample(g2, n=4))


# --------------------------------------------------------------------------- from-scratch init


@pytest.mark.parametrize("name", TIMM_TEST_MODELS)
def test_from_scratch_anchors_are_independent_draws_without_warning(name, make_timm):
    model = make_timm(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sub = ss.Line(model, seed=0)
    relevant = [w for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert relevant == [], [str(w.message) for w in relevant]
    a0, a1 = anchor_slices(sub, 0), anchor_slices(sub, 1)
    original = dict(model.named_parameters())
    assert set(a0) == set(original)
    varying = 0
    for n, v0 in a0.items():
        flat = v0.reshape(-1)
        if flat.numel() > 1 and not torch.all(flat == flat[0]):
            varying += 1
            assert not torch.equal(v0, a1[n]), f"{n}: both anchors got the same values"
            assert not torch.equal(v0, original[n]), f"{n}: anchor 0 kept the original values"
    assert varying > 5


@pytest.mark.parametrize(
    "name",
    [
        "test_resnet",
        "test_vit",
        "test_convnext",
        "test_efficientnet",
    ],
)
def test_from_scratch_anchors_use_the_networks_own_initialiser(name, make_timm):
    """[W] §4: each anchor is drawn with the network's own initialiser: its weights have the
    scale of a freshly built network's (std within a factor 1.5 for every tensor of >= 100 values)."""
    model = make_timm(name)
    sub = ss.Line(model, seed=0)
    a1 = anchor_slices(sub, 1)
    bad = []
    for n, p in model.named_parameters():
        if p.numel() >= 100 and p.std() > 0:
            ratio = (a1[n].std() / p.std()).item()
            if not 1 / 1.5 < ratio < 1.5:
                bad.append(f"{n}: std ratio {ratio:.2f}")
    assert bad == []


class _RawParamNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.randn(6))          # random, no init re-draws it
        self.offset = nn.Parameter(torch.full((4,), 0.5))  # constant: legitimately equal

    def forward(self, x):
        return self.lin(x) * self.scale[:4] + self.offset


def test_raw_random_parameter_is_shuffled_with_warning():
    torch.manual_seed(0)
    net = _RawParamNet()
    with pytest.warns(UserWarning, match="scale") as record:
        sub = ss.Line(net)
    assert not any("offset" in str(w.message) for w in record)
    s0, s1 = anchor_slices(sub, 0)["scale"], anchor_slices(sub, 1)["scale"]
    for s in (s0, s1):   # a permutation of the original values
        torch.testing.assert_close(s.sort().values, net.scale.detach().sort().values, atol=0, rtol=0)
    assert not torch.equal(s0, s1)
    assert torch.equal(anchor_slices(sub, 0)["offset"], anchor_slices(sub, 1)["offset"])


# --------------------------------------------------------------------------- gradients


def test_anchor_gradients_are_coefficient_times_weight_gradient(small_cnn):
    sub = ss.PolyChain(small_cnn(), bends=1, seed=0).train()
    x = torch.randn(4, 3, 8, 8)
    t = 0.3
    sub(x, point=t).square().mean().backward()
    plain = sub.export(t).train()
    plain(x).square().mean().backward()
    c = sub.coefficients(torch.tensor(t))
    assert c[2] == 0
    for k in range(3):
        grads = anchor_slices(sub, k, "grad")
        for n, p in plain.named_parameters():
            torch.testing.assert_close(grads[n], c[k] * p.grad, atol=1e-6, rtol=1e-5)


def test_gradients_reach_trainable_anchors_only(small_cnn):
    sub = ss.Bezier.connect(small_cnn(1), small_cnn(2), degree=2).train()
    sub(torch.randn(4, 3, 8, 8)).square().mean().backward()
    for k in (0, 2):
        assert all(p.grad is None for p in sub.anchor_parameters(k))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sub.anchor_parameters(1))
    sub.zero_grad(set_to_none=True)
    sub.unfreeze_anchor(0)
    sub(torch.randn(4, 3, 8, 8)).square().mean().backward()
    assert all(p.grad is not None for p in sub.anchor_parameters(0))
    assert all(p.grad is None for p in sub.anchor_parameters(2))


def test_from_scratch_every_anchor_gets_gradient(small_cnn):
    sub = ss.Simplex(small_cnn(), vertices=3, seed=0).train()
    sub(torch.randn(4, 3, 8, 8)).square().mean().backward()
    for k in range(3):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sub.anchor_parameters(k))


def test_shared_parameters_with_exclude_and_include(small_cnn):
    sub = ss.Line(small_cnn(), exclude=["5.*"], seed=0).train()
    names = sub.subspace_parameter_names()
    assert "5.weight" not in names and "5.bias" not in names and "0.weight" in names
    assert isinstance(sub.model[5].weight, nn.Parameter)
    assert "model.5.weight" in dict(sub.named_parameters())
    sub(torch.randn(4, 3, 8, 8)).square().mean().backward()
    assert sub.model[5].weight.grad is not None and sub.model[5].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in sub.anchor_parameters(0))
    e0, e1 = sub.export(0.0).state_dict(), sub.export(1.0).state_dict()
    assert torch.equal(e0["5.weight"], e1["5.weight"]) and not torch.equal(e0["0.weight"], e1["0.weight"])
    inc = ss.Line(small_cnn(), include=["0.*"])
    assert sorted(inc.subspace_parameter_names()) == ["0.bias", "0.weight"]
    assert isinstance(inc.model[1].weight, nn.Parameter) and isinstance(inc.model[5].weight, nn.Parameter)


def test_frozen_parameters_of_the_wrapped_model_stay_frozen():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)   # e.g. a frozen pretrained layer
    sub = ss.Line(net, seed=0).train()
    before = {t: sub.export(t).state_dict()["0.weight"] for t in (0.0, 0.5, 1.0)}
    opt = torch.optim.SGD([p for p in sub.parameters() if p.requires_grad], lr=1.0)
    sub(torch.randn(8, 3), point=0.3).square().mean().backward()
    opt.step()
    for t, w in before.items():
        assert torch.equal(sub.export(t).state_dict()["0.weight"], w), f"frozen 0.weight changed at t={t}"


# --------------------------------------------------------------------------- export / state


@pytest.mark.parametrize("name", TIMM_TEST_MODELS)
def test_export_loads_strict_into_fresh_timm_model(name, make_timm, timm_input):
    model = make_timm(name)
    x = timm_input(model)
    sub = ss.Simplex(model, vertices=3, seed=0).eval()
    point = torch.tensor([0.2, 0.5, 0.3])
    exported = sub.export(point)
    assert type(exported) is type(model)
    fresh = timm.create_model(name, num_classes=5)
    fresh.load_state_dict(exported.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(fresh.eval()(x), sub(x, point=point))
    # the export is independent of the subspace
    before = sub.anchor_parameters(0)[0].detach().clone()
    with torch.no_grad():
        next(exported.parameters()).add_(1.0)
    assert torch.equal(sub.anchor_parameters(0)[0], before)


def test_export_default_is_centre_and_anchor_loads_strict(make_timm):
    model = make_timm("test_vit")
    sub = ss.Line(model, seed=0)
    fresh = timm.create_model("test_vit", num_classes=5)
    fresh.load_state_dict(sub.anchor(1).state_dict(), strict=True)
    centre, half = sub.export().state_dict(), sub.export(0.5).state_dict()
    assert centre.keys() == half.keys()
    assert all(torch.equal(centre[k], half[k]) for k in centre)


def test_export_with_bn_loader_recomputes_bn(small_cnn):
    sub = ss.Line(small_cnn(), seed=0)
    gen = torch.Generator().manual_seed(0)
    loader = [torch.randn(8, 3, 8, 8, generator=gen) * 2 + 1 for _ in range(4)]
    with_bn = sub.export(0.3, bn_loader=loader, bn_batches=2)
    ref = ss.update_bn(sub.export(0.3), loader, max_batches=2)
    stale = bn_state(sub.export(0.3))
    got, want = bn_state(with_bn), bn_state(ref)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got["1.running_mean"], stale["1.running_mean"])


def test_state_dict_round_trip_and_generator_continues(small_cnn, tmp_path):
    x = torch.randn(4, 3, 8, 8)
    sub = ss.Simplex(small_cnn(), vertices=3, seed=11).train()
    for _ in range(3):   # advance the generator and BN buffers
        sub(x)
    path = tmp_path / "sub.pt"
    torch.save(sub.state_dict(), path)
    state = torch.load(path, weights_only=True)
    other = ss.Simplex(small_cnn(seed=5), vertices=3, seed=99)
    other.load_state_dict(state)
    sub.eval(), other.eval()
    with torch.no_grad():
        assert_close(other(x), sub(x), tol=0)
        assert_close(other(x, point=[0.1, 0.1, 0.8]), sub(x, point=[0.1, 0.1, 0.8]), tol=0)
    # training forwards continue with the same draws
    sub.train(), other.train()
    assert_close(other(x), sub(x), tol=0)
    assert torch.equal(other.sample(other.generator, n=5), sub.sample(sub.generator, n=5))
    # the subspace's own parameter layout survives
    assert sorted(other.state_dict()) == sorted(sub.state_dict())


# --------------------------------------------------------------------------- sampling modes


class _Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def _bound_values(sub, sampling_forwards=1):
    """Run a training forward and return, per module, the set of values in its bound weight and bias."""
    seen = {}

    def hook(name):
        def fn(module, inputs):
            seen[name] = (module.weight.detach().clone(), module.bias.detach().clone())

        return fn

    handles = [getattr(sub.model, n).register_forward_pre_hook(hook(n)) for n in ("a", "b", "c")]
    sub.train()
    sub(torch.randn(2, 3))
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("sampling", ["global", "layerwise"])
def test_layerwise_sampling_draws_a_point_per_module(sampling):
    sub = ss.Line(_Three(), sampling=sampling, seed=0)
    n = sub.num_subspace_parameters()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.zeros(n), sub.anchor_parameters(0))
        torch.nn.utils.vector_to_parameters(torch.ones(n), sub.anchor_parameters(1))
    seen = _bound_values(sub)
    ts = []
    for name, (w, b) in seen.items():
        t = w.reshape(-1)[0]
        assert torch.all(w == t) and torch.all(b == t), f"{name}: one point per module"
        assert 0 <= t <= 1
        ts.append(t.item())
    if sampling == "layerwise":
        assert len(set(ts)) == 3
    else:
        assert len(set(ts)) == 1


def test_layerwise_simplex_points_are_valid(set_anchor):
    sub = ss.Simplex(_Three(), vertices=3, sampling="layerwise", seed=0)
    n = sub.num_subspace_parameters()
    for k in range(3):
        set_anchor(sub, k, torch.full((n,), float(k)))
    seen = _bound_values(sub)
    values = {name: w.reshape(-1)[0].item() for name, (w, b) in seen.items()}
    # the value is sum_k p_k * k in (0, 2), and the modules got different points
    assert all(0 < v < 2 for v in values.values()) and len(set(values.values())) == 3


def test_speed_of_curves():
    line = ss.Line(vec_net(2))
    with torch.no_grad():
        line.anchor_parameters(0)[0].copy_(torch.tensor([[0.0, 0.0]]))
        line.anchor_parameters(1)[0].copy_(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(line.speed(torch.tensor([0.1, 0.5, 0.9])).double(), torch.full((3,), 5.0, dtype=torch.float64))
    chain = ss.PolyChain(vec_net(1), bends=1)
    for k, v in enumerate((0.0, 10.0, 11.0)):
        with torch.no_grad():
            chain.anchor_parameters(k)[0].fill_(v)
    torch.testing.assert_close(chain.speed(torch.tensor([0.1, 0.4, 0.6, 0.9])).double(), torch.tensor([20.0, 20.0, 2.0, 2.0], dtype=torch.float64))
    bez = ss.Bezier(vec_net(1), degree=2)
    for k, v in enumerate((0.0, 2.0, 1.0)):
        with torch.no_grad():
            bez.anchor_parameters(k)[0].fill_(v)
    t = torch.tensor([0.1, 0.3, 0.8])
    want = (2 * (1 - t) * 2.0 + 2 * t * (1.0 - 2.0)).abs()
    torch.testing.assert_close(bez.speed(t).double(), want.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sampling", ["arc_length", "global"])
def test_arc_length_sampling_concentrates_on_the_long_segment(sampling):
    a, b = vec_net(1), vec_net(1)
    with torch.no_grad():
        a.weight.fill_(0.0)
        b.weight.fill_(11.0)
    sub = ss.PolyChain.connect(a, b, bends=1, sampling=sampling, seed=0)
    with torch.no_grad():
        sub.anchor_parameters(1)[0].fill_(10.0)   # segment lengths 10 (t < 0.5) and 1 (t > 0.5)
    sub.train()
    one = torch.ones(1, 1)
    with torch.no_grad():
        w = torch.tensor([sub(one).item() for _ in range(2000)])
    t = torch.where(w <= 10, w / 20, 0.5 + (w - 10) / 2)
    frac = (t < 0.5).float().mean().item()
    if sampling == "arc_length":
        assert frac == pytest.approx(10 / 11, abs=0.03)
        first = t[t < 0.5]
        assert first.mean().item() == pytest.approx(0.25, abs=0.02)   # uniform within the segment
    else:
        assert frac == pytest.approx(0.5, abs=0.04)


# --------------------------------------------------------------------------- BatchNorm


def _bn_loader(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 3, 8, 8, generator=gen) * 3 + 2 for _ in range(n)]


def _assert_bn_equal(a: nn.Module, b: nn.Module, tol=1e-6):
    sa, sb = bn_state(a), bn_state(b)
    assert sa.keys() == sb.keys() and sa
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], atol=tol, rtol=tol)


def test_update_bn_matches_torch_swa_update_bn(small_cnn):
    loader = _bn_loader()
    ours, theirs = small_cnn(), small_cnn()
    ours.eval()
    ss.update_bn(ours, loader)
    torch_update_bn(loader, theirs)
    _assert_bn_equal(ours, theirs)
    assert not ours.training                     # mode restored
    assert ours[1].momentum == 0.1               # momentum restored


def test_update_bn_batch_formats_and_max_batches(small_cnn):
    loader = _bn_loader()
    ref = small_cnn()
    torch_update_bn(loader, ref)
    tuples = [(x, torch.zeros(len(x))) for x in loader]
    dicts = [{"image": x, "label": torch.zeros(len(x))} for x in loader]
    for batches in (tuples, dicts):
        m = small_cnn()
        ss.update_bn(m, batches)
        _assert_bn_equal(m, ref)
    m = small_cnn()
    ss.update_bn(m, loader, forward_fn=lambda model, batch: model(batch))
    _assert_bn_equal(m, ref)
    first2 = small_cnn()
    torch_update_bn(loader[:2], first2)
    m = small_cnn()
    ss.update_bn(m, dicts, max_batches=2)
    _assert_bn_equal(m, first2)


def test_update_bn_on_subspace_uses_the_point(small_cnn):
    loader = _bn_loader()
    sub = ss.Line(small_cnn(), seed=0)
    ss.update_bn(sub, loader, point=0.3)
    ref = ss.update_bn(sub.export(0.3), loader)
    _assert_bn_equal(sub.model, ref)
    assert sub._fixed is None
    other = ss.update_bn(sub.export(0.9), loader)
    assert not torch.allclose(bn_state(other)["1.running_var"], bn_state(ref)["1.running_var"])
    # without a point: the centre, or the fixed point if one is set
    ss.update_bn(sub, loader)
    _assert_bn_equal(sub.model, ss.update_bn(sub.export(0.5), loader))
    sub.set_point(0.9)
    ss.update_bn(sub, loader)
    _assert_bn_equal(sub.model, other)


# --------------------------------------------------------------------------- regularisers


def _with_vertices(cls, verts, **kwargs):
    verts = torch.tensor(verts, dtype=torch.float32)
    sub = cls(vec_net(verts.shape[1]), **kwargs)
    for k, v in enumerate(verts):
        with torch.no_grad():
            sub.anchor_parameters(k)[0].copy_(v.view(1, -1))
    return sub


def test_log_volume_known_shapes():
    tri = _with_vertices(ss.Simplex, [[0, 0], [1, 0], [0, 1]], vertices=3)
    assert ss.log_volume(tri).item() == pytest.approx(math.log(0.5), abs=1e-9)
    tri3 = _with_vertices(ss.Simplex, [[1, 1], [4, 1], [1, 4]], vertices=3)
    assert ss.log_volume(tri3).item() == pytest.approx(math.log(4.5), abs=1e-7)
    seg = _with_vertices(ss.Line, [[0.0], [1.0]])
    assert ss.log_volume(seg).item() == pytest.approx(0.0, abs=1e-9)
    seg2 = _with_vertices(ss.Line, [[1.0, 1.0], [4.0, 5.0]])
    assert ss.log_volume(seg2).item() == pytest.approx(math.log(5.0), abs=1e-9)
    tet = _with_vertices(ss.Simplex, [[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], vertices=4)
    assert ss.log_volume(tet).item() == pytest.approx(math.log(8 / 3), abs=1e-7)
    flat = _with_vertices(ss.Simplex, [[0, 0], [1, 1], [2, 2]], vertices=3)
    lv = ss.log_volume(flat)
    assert torch.isfinite(lv) and lv.item() < -10


def test_gram_is_the_anchor_inner_products():
    verts = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]
    sub = _with_vertices(ss.Simplex, verts, vertices=3)
    V = torch.tensor(verts, dtype=torch.float64)
    torch.testing.assert_close(sub.gram(), V @ V.T)


def test_log_volume_gradients_flow_to_trainable_anchors_only():
    sub = _with_vertices(ss.Simplex, [[0.2, 0.1], [1.3, 0.0], [0.1, 0.9]], vertices=3)
    sub.freeze_anchor(0)
    ss.log_volume(sub).backward()
    assert sub.anchor_parameters(0)[0].grad is None
    # reference: log(|det(W1 - W0, W2 - W0)| / 2)
    w0 = torch.tensor([0.2, 0.1], dtype=torch.float64)
    w1 = torch.tensor([1.3, 0.0], dtype=torch.float64, requires_grad=True)
    w2 = torch.tensor([0.1, 0.9], dtype=torch.float64, requires_grad=True)
    e1, e2 = w1 - w0, w2 - w0
    torch.log((e1[0] * e2[1] - e1[1] * e2[0]).abs() / 2).backward()
    torch.testing.assert_close(sub.anchor_parameters(1)[0].grad.double().view(-1), w1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sub.anchor_parameters(2)[0].grad.double().view(-1), w2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("w1,expected", [([0.0, 1.0], 0.0), ([2.0, 0.0], 1.0), ([-3.0, 0.0], 1.0), ([1.0, 1.0], 0.5)])
def test_cosine_penalty_known_angles(w1, expected):
    sub = _with_vertices(ss.Line, [[1.0, 0.0], w1])
    assert ss.cosine_penalty(sub).item() == pytest.approx(expected, abs=1e-7)
    assert ss.cosine_penalty(sub, pair=(1, 0)).item() == pytest.approx(expected, abs=1e-7)


def test_cosine_penalty_pair_and_gradients():
    sub = _with_vertices(ss.Simplex, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], vertices=3)
    assert ss.cosine_penalty(sub, pair=(0, 1)).item() == pytest.approx(0.0, abs=1e-9)
    assert ss.cosine_penalty(sub, pair=(0, 2)).item() == pytest.approx(0.5, abs=1e-7)
    sub.freeze_anchor(0)
    ss.cosine_penalty(sub, pair=(0, 2)).backward()
    assert sub.anchor_parameters(0)[0].grad is None
    assert sub.anchor_parameters(1)[0].grad is None or sub.anchor_parameters(1)[0].grad.abs().sum() == 0
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    (torch.dot(a, b) ** 2 / (a.dot(a) * b.dot(b))).backward()
    torch.testing.assert_close(sub.anchor_parameters(2)[0].grad.double().view(-1), b.grad, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- optimiser grouping


def _decay_split(opt) -> tuple[set[int], set[int]]:
    decay, no_decay = set(), set()
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        (decay if group["weight_decay"] > 0 else no_decay).update(ids)
    return decay, no_decay


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_create_optimizer_v2_splits_like_the_plain_model(name, make_timm):
    model = make_timm(name)
    sub = ss.Line(model, seed=0)
    opt = create_optimizer_v2(sub, "sgd", lr=0.1, weight_decay=1e-4)
    for group in opt.param_groups:
        assert group["weight_decay"] in (0.0, 1e-4)
    decay, no_decay = _decay_split(opt)
    for k in range(sub.num_anchors):
        for gname, p in sub.anchors[k].items():
            if gname.startswith("no_decay_"):
                assert id(p) in no_decay and p.ndim == 1
            else:
                assert gname.startswith("decay_") and id(p) in decay and p.ndim == 2
    plain_opt = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4)
    plain_decay, _ = _decay_split(plain_opt)
    plain_decay_names = {n for n, p in model.named_parameters() if id(p) in plain_decay}
    sub_decay_names = [n for g in sub._groups if g.decay for n in g.names]
    assert len(sub_decay_names) == len(set(sub_decay_names))
    assert set(sub_decay_names) == plain_decay_names
    if name == "test_vit":
        no_decay_names = {n for g in sub._groups if not g.decay for n in g.names}
        assert {"pos_embed", "cls_token"} <= no_decay_names
        # shared (excluded) parameters keep the model's own no_weight_decay() exemptions
        shared = ss.Line(model, exclude=["pos_embed", "cls_token", "head.*"], seed=0)
        decay, no_decay = _decay_split(create_optimizer_v2(shared, "sgd", lr=0.1, weight_decay=1e-4))
        assert id(shared.model.pos_embed) in no_decay and id(shared.model.cls_token) in no_decay
        assert id(shared.model.head.weight) in decay and id(shared.model.head.bias) in no_decay


def test_create_optimizer_v2_shared_params_and_frozen_anchors(small_cnn):
    sub = ss.Bezier.connect(small_cnn(1), small_cnn(2), degree=2, exclude=["5.*"])
    opt = create_optimizer_v2(sub, "sgd", lr=0.1, weight_decay=1e-4)
    decay, no_decay = _decay_split(opt)
    assert id(sub.model[5].weight) in decay and id(sub.model[5].bias) in no_decay
    frozen = {id(p) for k in (0, 2) for p in sub.anchor_parameters(k)}
    assert not frozen & (decay | no_decay)
    assert {id(p) for p in sub.anchor_parameters(1)} <= decay | no_decay


# --------------------------------------------------------------------------- every parameter takes part


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("test_vit", {}),
        ("test_convnext", {}),   # layer-scale gamma
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1, "init_values": 1e-5}),   # ViT LayerScale
    ],
)
def test_every_parameter_follows_the_point(name, kwargs, make_timm):
    model = make_timm(name, **kwargs)
    size = kwargs.get("img_size", model.pretrained_cfg["input_size"][-1])
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    sub = ss.Line(model, seed=0)
    names = sub.subspace_parameter_names()
    plain_names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(plain_names) and len(names) == len(set(names))
    sub.train()
    sub(x, point=0.4).square().mean().backward()
    for k in range(2):
        grads = anchor_slices(sub, k, "grad")
        unused = [n for n in plain_names if grads[n].abs().sum() == 0]
        assert unused == [], f"anchor {k}: no gradient reaches {unused}"
    sub.eval()
    with torch.no_grad():
        assert not torch.allclose(sub(x, point=0.0), sub(x, point=1.0), atol=1e-4)


class _DirectRead(nn.Module):
    """Reads its child's weight directly, as ViT attention blocks do with qkv weights."""

    def __init__(self) -> None:
        super().__init__()
        self.child = nn.Linear(3, 2)
        self.pos = nn.Parameter(torch.zeros(1, 3))   # a parameter of the parent itself

    def forward(self, x):
        return F.linear(x + self.pos, self.child.weight, self.child.bias)


def test_direct_weight_reads_follow_the_point(set_anchor):
    torch.manual_seed(0)
    sub = ss.Line(_DirectRead()).eval()
    n = sub.num_subspace_parameters()
    gen = torch.Generator().manual_seed(0)
    set_anchor(sub, 0, torch.randn(n, generator=gen))
    set_anchor(sub, 1, torch.randn(n, generator=gen))
    x = torch.randn(4, 3)
    for t in (0.0, 0.3, 1.0):
        e = sub.export(t)
        want = F.linear(x + e.pos, e.child.weight, e.child.bias)
        with torch.no_grad():
            assert_close(sub(x, point=t), want)
    assert not torch.allclose(sub(x, point=0.0), sub(x, point=1.0))


# --------------------------------------------------------------------------- autocast / compile


def test_autocast_bf16_keeps_mixed_weights_float32(make_timm, timm_input):
    model = make_timm("test_vit")
    x = timm_input(model)
    sub = ss.Line(model, seed=0).train()
    dtypes = {}

    def hook(name):
        def fn(module, inputs):
            dtypes[name] = (module.weight.dtype, module.bias.dtype)

        return fn

    mods = {"qkv": sub.model.blocks[0].attn.qkv, "head": sub.model.head, "patch": sub.model.patch_embed.proj, "norm": sub.model.norm}
    for n, m in mods.items():
        m.register_forward_pre_hook(hook(n))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sub(x)
    assert set(dtypes) == set(mods)
    assert all(d == (torch.float32, torch.float32) for d in dtypes.values()), dtypes
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    for k in range(2):
        for p in sub.anchor_parameters(k):
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_compile_no_recompile_when_the_point_changes(monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    sub = ss.Line(net, seed=0)
    compiled = torch.compile(sub)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    try:
        # warm up: train (sampled points) and eval, explicit tensor and float points
        sub.train()
        compiled(x).sum().backward()
        sub.eval()
        compiled(x)
        compiled(x, point=torch.tensor(0.2))
        compiled(x, point=0.2)
        compiled(x, point=0.6)   # dynamo makes a float input dynamic after its first change
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 2   # forward really runs compiled graphs (train and eval)
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        sub.train()
        outs = [compiled(x) for _ in range(3)]          # fresh points each forward
        assert not torch.allclose(outs[0], outs[1])
        outs[0].sum().backward()
        sub.eval()
        for t in (0.1, 0.8):
            with sub.at(t):
                got = compiled(x)
            assert_close(got, sub(x, point=t))
            sub.set_point(t)
            assert_close(compiled(x), got)
            sub.set_point(None)
            assert_close(compiled(x, point=torch.tensor(t)), got)
            assert_close(compiled(x, point=t), got)
        assert_close(compiled(x), sub(x, point=0.5))
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
