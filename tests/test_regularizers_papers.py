"""The regularisers as the papers' code computes them: [W]'s cos^2 over layer weights, exact
distances of small simplexes, [B]'s normalised log(Vol^2 + 1e-4) and several points per batch."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import subspaces as ss
from subspaces.geometry import CentredGram
from subspaces.regularizers import reference_log_volume, selected_names, squared_distances, volume_penalty

from helpers import DATA_TINY, checkpoint_progress, recipe_cmd, run


# --------------------------------------------------------------------------- [W]: cos^2 over conv / linear weights
def _conv_linear_cosine(a: nn.Module, b: nn.Module) -> float:
    """[W]'s code by hand: sums over the weight of every convolution and linear layer."""
    num = na = nb = 0.0
    mods_b = dict(b.named_modules())
    for name, m in a.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            wa, wb = m.weight.detach().double(), mods_b[name].weight.detach().double()
            num += float((wa * wb).sum())
            na += float((wa * wa).sum())
            nb += float((wb * wb).sum())
    return num**2 / (na * nb)


def test_cosine_penalty_covers_conv_and_linear_weights_by_default():
    torch.manual_seed(0)
    line = ss.Line(timm.create_model("test_resnet", num_classes=10, in_chans=1), seed=0)
    expected = _conv_linear_cosine(line.anchor(0), line.anchor(1))
    assert ss.cosine_penalty(line).item() == pytest.approx(expected, rel=1e-4, abs=1e-12)
    # the norms' scales (1 in every anchor) dominate when every parameter is covered
    everything = ss.cosine_penalty(line, params="all").item()
    assert everything > 100 * max(expected, 1e-9)
    conv_only = ss.cosine_penalty(line, params=["*conv*.weight", "stem*.weight"]).item()
    assert conv_only != pytest.approx(everything)


def test_weight_names_are_layer_weights_of_timm_models():
    vit = ss.Line(timm.create_model("test_vit", num_classes=5), seed=0)
    names = set(vit.weight_names())
    assert "pos_embed" not in names and "cls_token" not in names
    assert not any(n.endswith(".bias") or ".norm" in n for n in names)
    assert "patch_embed.proj.weight" in names and any(n.endswith("qkv.weight") for n in names)
    with pytest.raises(ValueError, match="no parameter"):
        selected_names(vit, ["no.such.*"])
    with pytest.raises(ValueError, match="'weights', 'all'"):
        ss.cosine_penalty(vit, params="conv")


def test_cosine_penalty_gradient_reaches_only_the_selected_weights():
    torch.manual_seed(0)
    line = ss.Line(timm.create_model("test_resnet", num_classes=10, in_chans=1), seed=0)
    ss.cosine_penalty(line).backward()
    for g in line._groups:
        grad = line.anchors[0][g.name].grad
        if g.decay:
            assert grad is not None and grad.abs().sum() > 0
        else:
            assert grad is None or grad.abs().sum() == 0, f"{g.name}: norms and biases got a cos^2 gradient"


# --------------------------------------------------------------------------- exact distances of a small simplex
def _small_simplex(spacing: float, n: int = 200_000) -> tuple[ss.Simplex, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = 1.0 + torch.randn(n, generator=gen, dtype=torch.float64)
    verts = torch.stack([base + spacing * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(3)])
    sub = ss.Simplex(nn.Linear(n, 1, bias=False), vertices=3)
    with torch.no_grad():
        for k in range(3):
            sub.anchor_parameters(k)[0].copy_(verts[k].float().view(1, -1))
    exact = torch.stack([sub.anchor_parameters(k)[0].detach().double().view(-1) for k in range(3)])   # what float32 holds
    return sub, exact


def test_small_simplex_distances_and_volume_match_float64():
    sub, V = _small_simplex(1e-5)
    want = torch.cdist(V, V) ** 2
    got = squared_distances(sub.gram(centred=True))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    d = V[1:] - V[0]
    vol = math.sqrt(float(torch.linalg.det(d @ d.T))) / 2
    assert ss.log_volume(sub).item() == pytest.approx(math.log(vol), abs=1e-5)
    ss.log_volume(sub).backward()
    assert all(sub.anchor_parameters(k)[0].grad.abs().sum() > 0 for k in range(3)), "a vertex got no gradient"


def test_uncentred_gram_is_the_raw_inner_products():
    sub, V = _small_simplex(1e-2, n=1000)
    torch.testing.assert_close(sub.gram(), V @ V.T, rtol=1e-5, atol=0)
    C = V - V.mean(0)
    torch.testing.assert_close(sub.gram(centred=True), C @ C.T, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("block", [None, 7, 64, 1000])
def test_centred_gram_in_blocks_is_the_stacked_centred_products(dtype, block):
    gen = torch.Generator().manual_seed(1)
    rows = [(0.5 + torch.randn(203, generator=gen)).to(dtype).requires_grad_(k != 1) for k in range(4)]
    weights = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    got = CentredGram.apply(block, *rows)
    (got * weights).sum().backward()
    got_grads = [r.grad for r in rows]
    ref_rows = [r.detach().clone().requires_grad_(k != 1) for k, r in enumerate(rows)]
    x = torch.stack(ref_rows).double()
    x = x - x.mean(0, keepdim=True)
    want = x @ x.T
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got_grads[1] is None, "a frozen row got a gradient"
    for k in (0, 2, 3):
        assert got_grads[k].dtype == dtype
        torch.testing.assert_close(got_grads[k], ref_rows[k].grad, rtol=1e-6 if dtype != torch.bfloat16 else 1e-2, atol=1e-6)


def test_centred_gram_gradients_pass_gradcheck_in_blocks():
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randn(10, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *r: CentredGram.apply(3, *r), rows)


# --------------------------------------------------------------------------- [B]'s volume term and its scale
def _triangle() -> ss.Simplex:
    sub = ss.Simplex(nn.Linear(2, 1, bias=False), vertices=3)
    with torch.no_grad():
        for k, v in enumerate([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]):
            sub.anchor_parameters(k)[0].copy_(torch.tensor([v]))
    return sub


def test_volume_penalty_is_log_of_squared_volume_plus_eps():
    assert volume_penalty(_triangle()).item() == pytest.approx(math.log(0.25 + 1e-4), abs=1e-9)
    degenerate = ss.Simplex(nn.Linear(2, 1, bias=False), vertices=3)   # all vertices equal: log(1e-4), finite
    with torch.no_grad():
        for k in range(3):
            degenerate.anchor_parameters(k)[0].fill_(0.5)
    assert volume_penalty(degenerate).item() == pytest.approx(math.log(1e-4), abs=1e-9)


def test_reference_log_volume_is_seeded_and_leaves_the_random_state():
    torch.manual_seed(0)
    sub = ss.Simplex.connect([timm.create_model("test_resnet", num_classes=10, in_chans=1)], new_vertices=1)
    state = torch.get_rng_state()
    a = reference_log_volume(sub, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert a == reference_log_volume(sub, seed=3) and a != reference_log_volume(sub, seed=4)
    assert a > 0   # freshly initialised networks are far apart: lambda / a keeps its sign


def test_simplex_recipe_uses_benton_form_and_several_points_per_batch(tmp_path):
    """recipes/simplex.py: [B]'s defaults (form, 5 points per batch) and each point a forward of its own."""
    base = tmp_path / "a"
    res = run(recipe_cmd("train.py", "--model", "test_resnet", *DATA_TINY, "--epochs", "1", "--output", base))
    assert res.rc == 0, res.explain()
    out = tmp_path / "simplex"
    res = run(recipe_cmd("simplex.py", base, *DATA_TINY, "--vertices", "2", "--epochs", "1", "--samples-per-step", "3",
                         "--samples", "2", "--output", out))
    assert res.rc == 0, res.explain()
    cfg = (out / "config.yaml").read_text()
    assert "volume_form: benton" in cfg and "samples_per_step: 3" in cfg and "volume_lambda: 1.0e-06" in cfg
    sub = ss.io.load_subspace(out / "simplex0" / "vertex1")
    updates = checkpoint_progress(out / "simplex0" / "vertex1")["updates"]
    assert sub.points_drawn == 3 * updates, "each batch should draw 3 points, one forward each"


def test_samples_per_step_needs_a_subspace(tmp_path):
    res = run(recipe_cmd("train.py", "--model", "test_resnet", *DATA_TINY, "--samples-per-step", "2", "--output", tmp_path / "x"))
    assert res.rc == 2 and "--samples-per-step" in res.stderr
