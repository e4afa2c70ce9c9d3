"""Mode-connecting simplicial complexes [B]: structure, frozen modes, shared-vertex gradients,
the per-simplex volume term, files, and recipes/complex.py end to end (with --resume)."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import subspaces as ss
from subspaces.complex import SimplicialComplex, load_complex, save_complex
from subspaces.complex_report import complex_cost
from subspaces.errors import ConfigError
from subspaces.regularizers import log_volume, reference_log_volume, volume_penalty

from helpers import DATA_TINY, read_json, recipe_cmd, run, run_all


@pytest.fixture(scope="module")
def modes() -> list[torch.nn.Module]:
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        out.append(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    return out


def _perturb_shared(sub: SimplicialComplex, scale: float = 0.05, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in sub.shared_indices():
            for p in sub.anchor_parameters(k):
                p.add_(scale * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------- structure
def test_simplices_points_and_centre(modes):
    sub = SimplicialComplex.connect(modes, shared=2, seed=0)
    assert sub.num_anchors == 5 and sub.modes == 3 and sub.shared == 2
    assert sub.simplices == ((0, 3, 4), (1, 3, 4), (2, 3, 4))
    assert [sub.anchor_trainable(k) for k in range(5)] == [False, False, False, True, True]
    pts = sub.sample(torch.Generator().manual_seed(1), n=600)
    assert pts.shape == (600, 5) and torch.allclose(pts.sum(-1), torch.ones(600)) and (pts >= 0).all()
    on_modes = (pts[:, :3] > 0).sum(-1)
    assert (on_modes == 1).all(), "every point lies in one simplex: exactly one mode coordinate is nonzero"
    counts = torch.bincount(pts[:, :3].argmax(-1), minlength=3)
    assert (counts > 150).all(), f"simplices are drawn uniformly, got {counts.tolist()}"
    # Dirichlet(1) over 3 vertices: each barycentric coordinate has mean 1/3
    assert pts[:, 3:].mean(0).sub(1 / 3).abs().max() < 0.05
    for i in range(3):
        q = sub.sample_simplex(i, torch.Generator().manual_seed(i), n=50)
        assert (q[:, [j for j in range(3) if j != i]] == 0).all() and torch.allclose(q.sum(-1), torch.ones(50))
        assert sub.simplex_of(q[0]) == i
    assert torch.equal(sub.centre(), torch.tensor([0, 0, 0, 0.5, 0.5]))
    with pytest.raises(ValueError, match="weight on modes \\[0, 1\\]"):
        sub.validate_point([0.5, 0.5, 0, 0, 0])
    with pytest.raises(ValueError, match="sums to"):
        sub.validate_point([0.5, 0, 0, 0.2, 0])
    with pytest.raises(ValueError, match="5 coordinates"):
        sub.validate_point([1.0, 0.0])


def test_bad_construction_is_a_config_error(modes):
    with pytest.raises(ConfigError, match="at least 2 trained networks"):
        SimplicialComplex.connect(modes[:1])
    with pytest.raises(ConfigError, match="shared=0"):
        SimplicialComplex.connect(modes, shared=0)
    with pytest.raises(ConfigError, match="sampling='global'"):
        SimplicialComplex.connect(modes, sampling="layerwise")
    other = timm.create_model("test_resnet", num_classes=5, in_chans=1)
    with pytest.raises(ConfigError, match="cannot connect these models"):
        SimplicialComplex.connect([modes[0], other])


def test_add_shared_vertex_starts_at_the_centroid_of_all_vertices(modes):
    sub = SimplicialComplex.connect(modes[:2], shared=1, seed=0)
    _perturb_shared(sub)
    before = [sub.anchor_parameters(k)[0].detach().clone() for k in range(3)]
    assert sub.add_shared_vertex() == 3
    assert sub.simplices == ((0, 2, 3), (1, 2, 3)) and not any(sub.anchor_trainable(k) for k in range(3))
    assert sub.anchor_trainable(3)
    torch.testing.assert_close(sub.anchor_parameters(3)[0], sum(before) / 3)


# --------------------------------------------------------------------------- gradients and volume
def test_shared_vertices_get_gradients_from_every_simplex(modes):
    sub = SimplicialComplex.connect(modes, shared=2, seed=0)
    _perturb_shared(sub)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sub.train()
    for i in range(sub.modes):
        sub.zero_grad(set_to_none=True)
        point = sub.sample_simplex(i, torch.Generator().manual_seed(10 + i))
        sub(x, point=point).square().mean().backward()
        for k in range(sub.num_anchors):
            grads = [p.grad for p in sub.anchor_parameters(k)]
            if k < sub.modes:
                assert all(g is None for g in grads), f"mode {k} is frozen but got a gradient"
            else:
                assert all(g is not None and g.abs().sum() > 0 for g in grads), f"shared vertex {k} got no gradient from simplex {i}"


def test_volume_terms_sum_over_simplices(modes):
    sub = SimplicialComplex.connect(modes, shared=2, seed=0)
    _perturb_shared(sub, scale=0.2)
    per_simplex = [ss.Simplex.connect([sub.anchor(k) for k in simplex]) for simplex in sub.simplices]
    expected = sum(float(volume_penalty(s).detach()) for s in per_simplex)
    assert float(volume_penalty(sub).detach()) == pytest.approx(expected, rel=1e-9)
    assert float(log_volume(sub).detach()) == pytest.approx(sum(float(log_volume(s).detach()) for s in per_simplex), rel=1e-9)
    ref = reference_log_volume(sub, seed=3)
    assert ref == pytest.approx(3 * reference_log_volume(per_simplex[0], seed=3), rel=0.05)   # three simplices of fresh networks
    # the gradient of the summed term reaches each shared vertex from all three simplices
    volume_penalty(sub).backward()
    grad = sub.anchor_parameters(3)[0].grad.clone()
    total = torch.zeros_like(grad)
    for s in per_simplex:
        s.unfreeze_anchor(1)
        volume_penalty(s).backward()
        total += s.anchor_parameters(1)[0].grad
    torch.testing.assert_close(grad, total, rtol=1e-4, atol=1e-9)


def test_a_plain_simplex_volume_is_unchanged(modes):
    sub = ss.Simplex.connect(modes, new_vertices=1)
    assert not hasattr(sub, "simplices")
    gram = sub.gram(centred=True).detach()
    d = torch.diagonal(gram)
    dist2 = (d[:, None] + d[None, :] - 2 * gram).clamp_min(0)
    n = sub.num_anchors - 1
    cm = torch.ones(n + 2, n + 2, dtype=torch.float64)
    cm[0, 0] = 0
    cm[1:, 1:] = dist2
    vol2 = (-1) ** (n + 1) * torch.linalg.det(cm) / (2**n * math.factorial(n) ** 2)
    assert float(volume_penalty(sub).detach()) == float(torch.log(vol2.clamp_min(0) + 1e-4))


def test_training_keeps_modes_bit_identical(modes, tmp_path):
    from subspaces.data import build_datasets

    data = build_datasets("fashion-mnist", train_subset=64, eval_subset=32, in_chans=1)
    sub = SimplicialComplex.connect(modes[:2], shared=1, seed=0)
    sub.add_shared_vertex()   # two shared vertices, the first frozen: the volume term has triangles
    sub.unfreeze_anchor(2)
    before = [[p.detach().clone() for p in sub.anchor_parameters(k)] for k in range(sub.num_anchors)]
    config = ss.TrainConfig(epochs=1, batch_size=32, lr=0.05, weight_decay=5e-4, volume_lambda=0.1, samples_per_step=2, bn_batches=1)
    trainer = ss.Trainer.create(config, sub, data, output=tmp_path / "run")
    trainer.fit()
    after = trainer.unwrapped
    for k in range(2):
        assert all(torch.equal(a, b) for a, b in zip(before[k], after.anchor_parameters(k))), f"mode {k} changed"
    for k in (2, 3):
        assert not all(torch.equal(a, b) for a, b in zip(before[k], after.anchor_parameters(k))), f"shared vertex {k} did not train"


def test_save_and_load_round_trip(modes, tmp_path):
    sub = SimplicialComplex.connect(modes, shared=1, seed=0)
    sub.add_shared_vertex()
    _perturb_shared(sub)
    save_complex(sub, tmp_path / "complex", {"model": "test_resnet", "num_classes": 10, "in_chans": 1})
    back = load_complex(tmp_path)
    assert (back.modes, back.shared, back.simplices) == (3, 2, sub.simplices)
    assert [back.anchor_trainable(k) for k in range(5)] == [sub.anchor_trainable(k) for k in range(5)]
    for name, t in sub.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    (tmp_path / "complex.safetensors").write_bytes(b"broken")
    with pytest.raises(ss.io.CheckpointError, match="corrupted"):
        load_complex(tmp_path)


def test_cost_is_counted_like_espro():
    cost = complex_cost(modes=3, shared=2, epochs=5, samples_per_step=5, base_epochs=10)
    assert cost["gradient_epochs"] == 50 and cost["complex_cost_B"] == 5.0 and cost["total_cost_B"] == 8.0


# --------------------------------------------------------------------------- the recipe
def test_recipe_end_to_end_with_resume(tmp_path):
    trained = run_all({s: recipe_cmd("train.py", "--model", "test_resnet", *DATA_TINY, "--epochs", "1", "--seed", str(s),
                                     "--output", tmp_path / f"m{s}") for s in (0, 1)})
    for res in trained.values():
        assert res.rc == 0, res.explain()
    out = tmp_path / "complex"
    args = [tmp_path / "m0", tmp_path / "m1", *DATA_TINY, "--shared", "2", "--epochs", "1", "--samples-per-step", "2",
            "--samples", "2", "--ensemble-members", "3", "--output", out]
    res = run(recipe_cmd("complex.py", *args, "--grid", "2"))
    assert res.rc == 0, res.explain()
    report = read_json(out / "results.json")
    assert report["simplex_vertices"] == [[0, 2, 3], [1, 2, 3]]
    assert set(report) >= {"vertices", "simplices", "complex", "ensembles", "cost", "seconds"}
    assert report["complex"]["points"] == 4 and report["ensembles"]["complex (2 points)"]["members"] == 2
    assert set(report["ensembles"]) == {"Ind (1 modes)", "Ind (2 modes)", "complex (1 points)", "complex (2 points)", "complex (3 points)"}
    assert report["cost"]["complex_cost_B"] == pytest.approx(2 * 1 * 2 / 1)
    assert (out / "plane.png").stat().st_size > 0 and "edges of the complex" in (out / "plane.json").read_text()
    assert "volume_lambda: 0.0" in (out / "shared0" / "config.yaml").read_text()   # [B]: none for the first shared vertex
    assert "volume_lambda: 0.1" in (out / "shared1" / "config.yaml").read_text()
    sub = load_complex(out)
    for k in range(2):   # the modes are bit-identical to the trained networks
        mode = ss.io.load_model(tmp_path / f"m{k}")
        anchor = dict(sub.anchor(k).named_parameters())
        assert all(torch.equal(p, anchor[n]) for n, p in mode.named_parameters()), f"mode {k} changed"
    first = {n: t.clone() for n, t in sub.state_dict().items()}
    # a run stopped after the last stage's training: its checkpoint is continued, earlier stages reused
    (out / "shared1" / "complex.safetensors").unlink()
    (out / "results.json").unlink()
    res = run(recipe_cmd("complex.py", "--resume", out, "--grid", "0"))
    assert res.rc == 0, res.explain()
    assert "shared vertex 0 already trained" in res.stdout + res.stderr and "resumed from" in res.stdout + res.stderr
    again = load_complex(out)
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in first.items() if not n.endswith("_extra_state"))
    assert read_json(out / "results.json")["simplex_vertices"] == [[0, 2, 3], [1, 2, 3]]


def test_recipe_refuses_one_mode(tmp_path):
    res = run(recipe_cmd("complex.py", tmp_path / "missing", "--output", tmp_path / "c"))
    assert res.rc == 2 and "at least 2 modes" in res.stderr
