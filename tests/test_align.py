"""Permutation alignment: the spec found by tracing never changes a network's function, and weight
matching undoes a random permutation exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from subspaces.align import (PermutationSpec, align, apply_permutation, check_spec, parameter_distance, permutation_spec,
                             random_permutation, weight_matching)
from subspaces.errors import ConfigError

#: tiny timm families the spec supports: residual CNNs, depthwise / inverted residual with squeeze-excite,
#: ConvNeXt (LayerNorm2d, layer scale), ViT (cls_token, pos_embed, attention), conv-attention hybrids,
#: relative-position ViT, MambaOut; test_nfnet is the one tiny timm model it refuses (see below)
FAMILIES = ["test_resnet", "test_convnext", "test_vit", "test_efficientnet", "test_byobnet", "test_coatnet", "test_maxvit",
            "test_vit_relpos", "test_mambaout", "test_efficientnet_ln"]


def randomised(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """The model with every parameter perturbed (norm scales and biases start constant, which
    would hide a wrong permutation of them) and BatchNorm running statistics away from (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.train()
        for _ in range(2):
            model(x + torch.randn(x.shape, generator=gen))
    return model.eval()


def params_differ(a: nn.Module, b: nn.Module) -> int:
    sb = b.state_dict()
    return sum(1 for k, v in a.state_dict().items() if v.is_floating_point() and not torch.equal(v, sb[k]))


@pytest.mark.parametrize("name", FAMILIES)
def test_random_permutation_keeps_outputs(name, make_timm, timm_input):
    model = make_timm(name, seed=0)
    x = timm_input(model)
    model = randomised(model, x)
    spec = permutation_spec(model, x)
    assert len(spec) > 0 and all(n > 1 for n in spec.sizes)
    perms = random_permutation(spec, torch.Generator().manual_seed(3))
    permuted = apply_permutation(model, spec, perms).eval()
    assert params_differ(model, permuted) > 0, "the permutation moved nothing: the test would not see a wrong spec"
    with torch.no_grad():
        y, yp = model(x), permuted(x)
    torch.testing.assert_close(yp, y, atol=1e-5 * (1 + float(y.abs().max())), rtol=1e-4)
    assert not model.training and not permuted.training


@pytest.mark.parametrize("name", FAMILIES)
def test_weight_matching_undoes_a_random_permutation(name, make_timm, timm_input):
    model = make_timm(name, seed=1)
    x = timm_input(model)
    model = randomised(model, x, seed=1)
    spec = permutation_spec(model, x)
    shuffled = apply_permutation(model, spec, random_permutation(spec, torch.Generator().manual_seed(5)))
    assert parameter_distance(model, shuffled) > 1e-2
    perms, info = weight_matching(model, shuffled, spec)
    recovered = apply_permutation(shuffled, spec, perms)
    assert parameter_distance(model, recovered) < 1e-6
    for k, v in model.state_dict().items():     # buffers (BatchNorm statistics) too
        torch.testing.assert_close(recovered.state_dict()[k], v, atol=1e-6, rtol=0)
    assert info["similarity_after"] >= info["similarity_before"]


def test_align_two_independent_networks(make_timm, timm_input):
    a, b = make_timm("test_resnet", seed=0), make_timm("test_resnet", seed=1)
    x = timm_input(a)
    a, b = randomised(a, x, seed=0), randomised(b, x, seed=1)
    aligned, info = align(a, b, x)
    with torch.no_grad():
        torch.testing.assert_close(aligned.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-4)
    assert info["distance_after"] < info["distance_before"]
    assert info["similarity_after"] > info["similarity_before"]
    assert info["channels_moved"] > 0
    again, info2 = align(a, b, x)
    assert info2["distance_after"] == info["distance_after"], "weight matching is not deterministic"
    assert params_differ(aligned, again) == 0


def test_a_wrong_spec_is_caught(make_timm, timm_input):
    model = make_timm("test_resnet", seed=0)
    x = timm_input(model)
    model = randomised(model, x)
    spec = permutation_spec(model, x)
    g = max(range(len(spec)), key=lambda i: len(spec.groups[i]))
    name, axis = spec.groups[g][0]              # forget one tensor axis of a group: the function changes
    axes = {k: list(v) for k, v in spec.axes.items()}
    axes[name][axis] = None
    broken = PermutationSpec([list(m) for m in spec.groups], list(spec.sizes), axes)
    with pytest.raises(ConfigError, match="changes its outputs"):
        check_spec(model, broken, x)


def test_a_model_that_cannot_be_aligned_names_the_layer(make_timm, timm_input):
    model = make_timm("test_nfnet", seed=0)     # ScaledStdConv2d carries a gain the walker does not analyse
    with pytest.raises(ConfigError, match=r"cannot be aligned.*stem\.conv1.*ScaledStdConv2d"):
        permutation_spec(model, timm_input(model))


def test_unknown_operations_are_left_in_place():
    class Shuffle(nn.Module):
        """A channel shuffle between two convolutions: parameter-free and shape-preserving, but
        not elementwise; the numerical check must refuse to permute across it if misread."""

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            h = torch.roll(h, 1, dims=1)
            return self.b(h).mean((2, 3))

    torch.manual_seed(0)
    model, x = Shuffle().eval(), torch.randn(2, 3, 4, 4)
    with pytest.raises(ConfigError, match="cannot be aligned"):
        permutation_spec(model, x)


def test_align_refuses_different_architectures(make_timm, timm_input):
    a, b = make_timm("test_resnet"), make_timm("test_resnet", num_classes=3)
    with pytest.raises(ConfigError, match="cannot connect"):
        align(a, b, timm_input(a))


def test_connect_align_recipe_fits_the_curve_between_aligned_ends(tmp_path):
    """recipes/connect.py --align: B's end of the curve is B permuted towards A (closer to A than
    B itself), the alignment is recorded, and the run resumes with its flag from config.yaml."""
    import json

    import timm
    import yaml

    from helpers import DATA_TINY, recipe_cmd, run
    from subspaces.io import load_model, load_subspace, save_model

    spec = {"model": "test_resnet", "num_classes": 10, "in_chans": 1, "model_kwargs": {}, "img_size": 28,
            "mean": [0.2860], "std": [0.3530], "dataset": "fashion-mnist"}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_model(timm.create_model("test_resnet", num_classes=10, in_chans=1), tmp_path / name, spec)
    out = tmp_path / "ab"
    res = run(recipe_cmd("connect.py", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--align", "--epochs", "1",
                         *DATA_TINY, "--output", out))
    assert res.rc == 0, res.explain()
    info = json.loads((out / "alignment.json").read_text())
    assert info, info
    assert yaml.safe_load((out / "config.yaml").read_text())["align"] is True
    a, b = load_model(tmp_path / "a.safetensors"), load_model(tmp_path / "b.safetensors")
    end = load_subspace(out)
    aligned_end = end.anchor(end.num_anchors - 1)
    assert parameter_distance(a, aligned_end) < parameter_distance(a, b)


@pytest.mark.parametrize("preset", sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs" / "align").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_alignment_presets_are_valid_configs_of_their_recipe(preset):
    """Every key of a GPU preset is a flag of the recipe it names (train.py or connect.py)."""
    import subprocess
    import sys

    from helpers import REPO, recipe_env

    recipe = "connect.py" if preset.stem.endswith("_connect") else "train.py"
    ends = ["a", "b"] if recipe == "connect.py" else []
    res = subprocess.run([sys.executable, str(REPO / "recipes" / recipe), *ends, "-c", str(preset), "--help"], cwd=REPO,
                         env=recipe_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


#: full-size timm families at their random initialisation, where norm and layer scales are constant and
#: a pooling token mixer has no weights: residual CNN with BatchNorm, ConvNeXt (LayerNorm2d, depthwise,
#: layer scale), PoolFormer (GroupNorm, pooling), ViT (cls_token, pos_embed, attention), MobileNetV3
#: (squeeze-excite, hard-swish), RegNetX (grouped convolutions left in place)
FULL_SIZE = [("resnet18", {}), ("convnext_atto", {}), ("poolformer_s12", {}), ("vit_tiny_patch16_224", {"img_size": 64}),
             ("mobilenetv3_small_100", {}), ("regnetx_002", {})]


@pytest.mark.parametrize("name, kwargs", FULL_SIZE, ids=[n for n, _ in FULL_SIZE])
def test_align_undoes_a_permutation_of_a_full_size_network(name, kwargs, make_timm):
    """align(A, P(A)) returns A exactly: distance 0 and the similarity sum_p ||W_A^p||^2, which is the
    Cauchy-Schwarz bound; coordinate descent from the identity alone stops short of it on
    convnext_atto and poolformer_s12 (docs/alignment.md)."""
    model = make_timm(name, seed=0, num_classes=3, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    spec = permutation_spec(model, x)
    shuffled = apply_permutation(model, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    assert parameter_distance(model, shuffled) > 1.0
    aligned, info = align(model, shuffled, x, spec=spec)
    assert info["distance_after"] <= 1e-6 * info["distance_before"], info
    exact = sum(float(p.detach().double().pow(2).sum()) for n, p in model.named_parameters() if n in spec.axes)
    assert info["similarity_after"] == pytest.approx(exact, rel=1e-9, abs=0)
    assert info["bound_reached"] and info["similarity_bound"] == pytest.approx(exact, rel=1e-9, abs=0)
    for k, v in model.state_dict().items():     # buffers (BatchNorm statistics) too
        torch.testing.assert_close(aligned.state_dict()[k], v, atol=0, rtol=0)


def test_weight_matching_reports_every_start(make_timm, timm_input):
    """Two independent networks: every start runs (the bound is out of reach), the kept one has the
    highest similarity and the best alternative is the runner-up."""
    a, b = make_timm("test_resnet", seed=0), make_timm("test_resnet", seed=1)
    x = timm_input(a)
    a, b = randomised(a, x, seed=0), randomised(b, x, seed=1)
    spec = permutation_spec(a, x)
    perms, info = weight_matching(a, b, spec, restarts=2)
    scores = sorted(s["similarity"] for s in info["starts"])
    assert [s["start"] for s in info["starts"]] == ["sorted", "identity", "random 1", "random 2"]
    assert not info["bound_reached"] and info["similarity_after"] < info["similarity_bound"]
    assert info["similarity_after"] == scores[-1] and info["similarity_alternative"] == scores[-2]
    assert info["similarity_after"] == pytest.approx(
        float(sum((p.detach().double() * apply_permutation(b, spec, perms).state_dict()[n].double()).sum()
                  for n, p in a.named_parameters() if n in spec.axes)), rel=1e-12)
    with pytest.raises(ConfigError, match="restarts"):
        weight_matching(a, b, spec, restarts=-1)
