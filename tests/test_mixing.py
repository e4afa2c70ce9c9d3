"""Tests of the mixing hot path: chunked flat anchors, the lerp chain for convex
coefficients, and storage reuse on CPU that must never be observable."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2

import subspaces as ss
from subspaces import anchor_store
from subspaces.anchor_store import split_group
from subspaces.mixing import lerp_steps


def _lerp_chain(anchors: list[torch.Tensor], steps: torch.Tensor) -> torch.Tensor:
    out = torch.lerp(anchors[0], anchors[1], steps[0])
    for a, s in zip(anchors[2:], steps[1:]):
        out = torch.lerp(out, a, s)
    return out


# --------------------------------------------------------------------------- lerp chain


@pytest.mark.parametrize("K", [2, 3, 5])
def test_lerp_chain_equals_the_weighted_sum_at_convex_coefficients(K):
    gen = torch.Generator().manual_seed(K)
    anchors = [torch.randn(1000, generator=gen) for _ in range(K)]
    for _ in range(20):
        c = torch.distributions.Dirichlet(torch.ones(K)).sample()
        steps = lerp_steps(c)
        assert steps is not None and steps.shape == (K - 1,)
        assert (steps >= 0).all() and (steps <= 1).all()
        want = sum(ck * a for ck, a in zip(c, anchors))
        torch.testing.assert_close(_lerp_chain(anchors, steps.float()), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_lerp_chain_is_exact_at_the_vertices(K):
    anchors = [torch.randn(1000) for _ in range(K)]
    for k in range(K):
        c = torch.zeros(K)
        c[k] = 1
        assert torch.equal(_lerp_chain(anchors, lerp_steps(c).float()), anchors[k])


def test_lerp_is_used_only_for_convex_coefficients_on_the_cpu():
    assert lerp_steps(torch.tensor([-0.5, 1.5])) is None   # a line extrapolated past its end
    assert lerp_steps(torch.tensor([0.5, 0.6])) is None    # not summing to one
    assert lerp_steps(torch.tensor([[0.5, 0.5], [0.5, 0.5]])) is None   # layerwise
    assert lerp_steps(torch.tensor([1.0])) is None


class _OffsetLine(ss.Line):
    """w(t) = W_0 + t W_1: coefficients (1, t) that do not sum to one (a user-defined shape)."""

    def coefficients(self, point):
        t = torch.as_tensor(point, dtype=torch.float32)
        return torch.stack([torch.ones_like(t), t], -1)

    def validate_point(self, point):
        return torch.as_tensor(point, dtype=torch.float32)


@pytest.mark.parametrize("t", [0.5, 2.0, -0.75])
def test_coefficients_that_are_not_convex_use_the_weighted_sum(t, small_cnn):
    sub = _OffsetLine(small_cnn(), seed=0).eval()
    x = torch.randn(4, 3, 8, 8)
    want = small_cnn()
    a0, a1 = sub.anchor(0).state_dict(), sub.anchor(1).state_dict()
    want.load_state_dict({n: a0[n] + t * a1[n] if "running" not in n and "num_batches" not in n else a0[n] for n in a0})
    with torch.no_grad():
        torch.testing.assert_close(sub(x, point=t), want.eval()(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- chunked anchors


def testsplit_group_keeps_order_and_respects_the_size_limit(make_timm):
    model = make_timm("test_resnet")
    sub = ss.Line(model, seed=0)
    whole = sum(g.numel for g in sub._groups)
    (decay,) = [g for g in sub._groups if g.decay]
    assert decay.name == "decay_float32_0"   # test_resnet is smaller than one chunk
    limit = 4096 * 4
    chunks = split_group(decay, limit)
    assert len(chunks) > 3
    assert [c.name for c in chunks] == [f"decay_float32_0_{j}" for j in range(len(chunks))]
    assert [n for c in chunks for n in c.names] == decay.names
    assert sum(c.numel for c in chunks) == decay.numel
    for c in chunks:   # full chunks, or a tensor larger than a chunk on its own
        assert c.numel * 4 <= limit or len(c.numels) == 1
    assert whole == sub.num_subspace_parameters()


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(anchor_store, "CHUNK_BYTES", 2048)


@pytest.mark.parametrize("shape", ["line", "bezier", "simplex"])
def test_chunked_anchors_give_the_same_networks_gradients_and_exports(shape, small_chunks, make_timm, timm_input):
    model = make_timm("test_resnet")
    x = timm_input(model)
    ctor = {"line": lambda m: ss.Line(m, seed=0), "bezier": lambda m: ss.Bezier(m, degree=2, seed=0),
            "simplex": lambda m: ss.Simplex(m, vertices=3, seed=0)}[shape]
    sub = ctor(model)
    decay_chunks = [g for g in sub._groups if g.decay]
    assert len(decay_chunks) > 5
    assert sum(g.numel for g in sub._groups) == sum(p.numel() for p in model.parameters())
    names = set(sub.anchors[0].keys())
    assert {f"decay_float32_{j}" for j in range(len(decay_chunks))} <= names
    # every point is the network with the mixed weights, and the export loads strict into timm
    sub.train()
    point = torch.tensor([0.2, 0.5, 0.3]) if shape == "simplex" else 0.3
    sub(x, point=point).square().mean().backward()
    plain = sub.export(point).train()
    plain(x).square().mean().backward()
    fresh = timm.create_model("test_resnet", num_classes=5)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    c = sub.coefficients(sub.validate_point(point))
    for k in range(sub.num_anchors):
        grads = {}
        for g in sub._groups:
            flat = sub.anchors[k][g.name].grad
            for n, piece, s in zip(g.names, torch.split(flat.reshape(-1), g.numels), g.shapes):
                grads[n] = piece.view(s)
        for n, p in plain.named_parameters():
            torch.testing.assert_close(grads[n], c[k] * p.grad, atol=1e-6, rtol=1e-5)
    # the anchors come back as the networks they are, and timm's optimiser splits decay as usual
    sub.eval()
    with torch.no_grad():
        torch.testing.assert_close(sub(x, point=torch.eye(3)[2] if shape == "simplex" else 1.0), sub.anchor(sub.num_anchors - 1).eval()(x), atol=1e-5, rtol=1e-5)
    opt = create_optimizer_v2(sub, "sgd", lr=0.1, weight_decay=1e-4)
    decayed = {id(p) for group in opt.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    for k in range(sub.num_anchors):
        for gname, p in sub.anchors[k].items():
            assert (id(p) in decayed) == gname.startswith("decay_")


def test_chunked_state_dict_round_trip(small_chunks, make_timm, timm_input, tmp_path):
    model = make_timm("test_vit")
    x = timm_input(model)
    sub = ss.Bezier(model, degree=2, seed=0).eval()
    assert len(sub._groups) > 2
    path = tmp_path / "sub.safetensors"
    save_file({k: v.contiguous() for k, v in sub.state_dict().items()}, str(path))
    other = ss.Bezier(make_timm("test_vit", seed=1), degree=2, seed=1).eval()
    with torch.no_grad():
        assert not torch.allclose(other(x, point=0.7), sub(x, point=0.7))
        other.load_state_dict(load_file(str(path)))
        torch.testing.assert_close(other(x, point=0.7), sub(x, point=0.7))


# --------------------------------------------------------------------------- reused storage is never observable


@pytest.mark.parametrize("chunked", [False, True])
def test_weights_and_gradients_kept_by_the_user_are_never_overwritten(chunked, monkeypatch, small_cnn):
    if chunked:
        monkeypatch.setattr(anchor_store, "CHUNK_BYTES", 64)
    sub = ss.Line(small_cnn(), seed=0).train()
    x = torch.randn(4, 3, 8, 8)
    opt = torch.optim.SGD(sub.parameters(), lr=0.1, momentum=0.9)
    kept_weights, kept_grads = [], []
    for step, t in enumerate([0.1, 0.9, 0.4, 0.6]):
        opt.zero_grad(set_to_none=True)
        out = sub(x, point=t)
        w = sub.model[0].weight   # the weights the forward used, as the model shows them now
        kept_weights.append((w, w.clone()))
        F.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward()
        if step % 2 == 0:   # keep every other gradient, as a user logging gradients would
            g = sub.anchor_parameters(1)[0].grad
            kept_grads.append((g, g.clone()))
        opt.step()
    for w, copy_ in kept_weights:
        assert torch.equal(w, copy_)
    for g, copy_ in kept_grads:
        assert torch.equal(g, copy_)


# --------------------------------------------------------------------------- binding through public nn.Module calls


def test_the_model_keeps_its_parameter_order_and_a_moved_subspace_binds_at_the_next_forward(small_cnn):
    """Subspace parameters leave the wrapped model through register_parameter(name, None), so the
    export lists the plain model's names in its order; no nn.Module internals are overridden, so
    ``.double()`` moves the anchors and the next forward binds weights of the new dtype."""
    from torch import nn

    model = small_cnn()
    sub = ss.Line(model, exclude=["5.*"], seed=0)
    assert type(sub)._apply is nn.Module._apply
    assert [n for n, _ in sub.model.named_parameters()] == ["5.weight", "5.bias"]   # only the shared ones are Parameters
    assert list(sub.export(0.3).state_dict()) == list(model.state_dict())
    sub.double().eval()
    out = sub(torch.randn(2, 3, 8, 8, dtype=torch.float64), point=0.3)
    assert out.dtype == torch.float64 and sub.model[0].weight.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in sub.parameters())
