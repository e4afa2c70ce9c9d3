"""Tests of the batched point evaluation (subspaces.pointwise) and the analysis scripts
(analysis/curve.py, plane.py, line.py) on tiny models and data subsets."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import subspaces as ss
from subspaces.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from subspaces.ensembles import evaluate
from subspaces.io import save_model, save_subspace
from subspaces.pointwise import (
    BNStates,
    at_coefficients,
    bn_statistics,
    evaluate_coefficients,
    evaluate_points,
    export_coefficients,
    integrate_speed,
    point_coefficients,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "analysis"))   # the scripts import their sibling `common` as a script does

from analysis import curve as curve_script  # noqa: E402
from analysis import line as line_script  # noqa: E402
from analysis import plane as plane_script  # noqa: E402

SPEC = {"model": "test_resnet", "num_classes": 10, "in_chans": 1, "model_kwargs": {}, "img_size": 28,
        "mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD), "dataset": "fashion-mnist"}
FAST = ["--train-subset", "16", "--eval-subset", "16", "-b", "16", "--bn-batches", "1", "--device", "cpu"]


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many tiny forwards: on a busy shared CPU, OpenMP threads waiting for each
    other cost far more than the arithmetic (10-100x here), so use one thread, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def tiny_data(n: int = 40, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen) * 1.5 + 0.5
    y = torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def perturb(sub: ss.Subspace, k: int, scale: float = 0.5, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sub.anchor_parameters(k):
            p.add_(scale * torch.randn(p.shape, generator=gen))


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny run folders: a connect run (quadratic Bezier between two test_resnets, middle anchor moved
    off the segment), a 1-bend chain, a line from scratch, and three plain model files."""
    root = tmp_path_factory.mktemp("runs")
    a = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    torch.manual_seed(1)
    b = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    bez = ss.Bezier.connect(a, b, degree=2)
    perturb(bez, 1, scale=0.05)
    save_subspace(bez, root / "connect" / "subspace", SPEC)
    chain = ss.PolyChain.connect(a, b, bends=1)
    perturb(chain, 1, scale=0.05, seed=1)
    save_subspace(chain, root / "chain" / "subspace", SPEC)
    torch.manual_seed(2)
    line = ss.Line(timm.create_model("test_resnet", num_classes=10, in_chans=1), seed=0)
    save_subspace(line, root / "line" / "subspace", SPEC)
    for k, name in enumerate(("A", "THETA", "B")):
        save_model(bez.anchor(k), root / "models" / name, SPEC)
    save_model(a, root / "plain" / "model", SPEC)
    return {"connect": root / "connect", "chain": root / "chain", "line": root / "line", "models": root / "models",
            "plain": root / "plain", "root": root}


# --------------------------------------------------------------------------- batched == one at a time
@pytest.mark.parametrize("shape", ["bezier", "simplex"])
def test_batched_points_equal_one_at_a_time(shape):
    a, b, c = tiny_net(0), tiny_net(1), tiny_net(2)
    if shape == "bezier":
        sub = ss.Bezier.connect(a, b, degree=2)
        perturb(sub, 1)
        points = [0.0, 0.25, 0.5, 0.9, 1.0]
    else:
        sub = ss.Simplex.connect([a, b, c])
        points = [[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]]
    bn_loader, eval_loader = tiny_data(48, seed=1), tiny_data(40, seed=2)
    before = {n: t.clone() for n, t in bn_buffers(sub).items()}
    coeffs = point_coefficients(sub, points)
    states = bn_statistics(sub, coeffs, bn_loader, max_batches=2)
    batched = evaluate_coefficients(sub, coeffs, eval_loader, bn_states=states)
    assert states.batches == 2 and batched.count == 40
    for i, p in enumerate(points):
        ref = sub.export(p, bn_loader=bn_loader, bn_batches=2)
        for name, module in ref.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                got = states.states[i][name]
                torch.testing.assert_close(got["running_mean"], module.running_mean, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got["running_var"], module.running_var, atol=1e-5, rtol=1e-5)
                assert int(got["num_batches_tracked"]) == int(module.num_batches_tracked) == 2
        m = evaluate(ref, eval_loader)
        assert abs(m["acc"] - float(batched.acc[i])) < 1e-6
        assert abs(m["nll"] - float(batched.loss[i])) < 1e-5
    # the subspace's own buffers, mode and point are left as they were
    for n, t in bn_buffers(sub).items():
        assert torch.equal(t, before[n]), n
    assert sub._fixed is None and sub.training


def test_bn_states_are_read_from_their_tensors_also_when_replaced():
    """evaluate_coefficients runs each point with the tensors in ``bn_states.states``: the same
    bits from bn_statistics' flat buffers and from the per-buffer tensors alone, and a tensor
    replaced by hand after bn_statistics is the one used."""
    sub = ss.Bezier.connect(tiny_net(0), tiny_net(1), degree=2)
    perturb(sub, 1)
    loader = tiny_data(32, seed=1)
    c = point_coefficients(sub, [0.0, 0.5])
    states = bn_statistics(sub, c, loader)
    flat = evaluate_coefficients(sub, c, loader, bn_states=states)
    plain = evaluate_coefficients(sub, c, loader, bn_states=BNStates(states.states, states.batches))
    assert torch.equal(flat.loss, plain.loss) and torch.equal(flat.acc, plain.acc)
    name = next(iter(states.states[0]))
    assert not torch.equal(states.states[0][name]["running_mean"], states.states[1][name]["running_mean"])
    for module, bufs in states.states[0].items():   # point 0 now holds point 1's statistics, in new tensors
        for buf in list(bufs):
            bufs[buf] = states.states[1][module][buf].clone()
    same = evaluate_coefficients(sub, c[[1, 1]], loader, bn_states=states)
    assert torch.equal(same.loss[0], same.loss[1]) and torch.equal(same.loss[1], flat.loss[1])


def test_batched_coefficients_off_the_shape_and_ensembles():
    """Arbitrary linear combinations (outside the shape), the one-call API, dedup and ensembles."""
    sub = ss.Bezier.connect(tiny_net(0), tiny_net(1), degree=2)
    perturb(sub, 1)
    coeffs = torch.tensor([[1.0, 0.0, 0.0], [1.3, -0.8, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [-0.2, 0.6, 0.6]])
    bn_loader, eval_loader = tiny_data(48, seed=3), tiny_data(40, seed=4)
    res = evaluate_points(sub, coefficients=coeffs, loaders={"test": eval_loader}, bn_loader=bn_loader, bn_batches=3,
                          ensembles=[[0, 2], [1, 4, 2]])["test"]
    probs = []
    for i, c in enumerate(coeffs):
        ref = export_coefficients(sub, c, bn_loader=bn_loader, bn_batches=3)
        m = evaluate(ref, eval_loader)
        assert abs(m["acc"] - float(res.acc[i])) < 1e-6 and abs(m["nll"] - float(res.loss[i])) < 1e-5
        ref.eval()
        with torch.no_grad():
            probs.append(torch.cat([torch.softmax(ref(x), -1) for x, _ in eval_loader]))
    y = torch.cat([y for _, y in eval_loader])
    for j, members in enumerate([[0, 2], [1, 4, 2]]):
        p = sum(probs[i] for i in members) / len(members)
        assert abs(float((p.argmax(-1) == y).double().mean()) - float(res.ensemble_acc[j])) < 1e-6
        nll = float(-p.gather(1, y[:, None]).log().mean())
        assert abs(nll - float(res.ensemble_loss[j])) < 1e-5
    # running the subspace at the coefficients gives the same outputs as the exported model
    x = next(iter(eval_loader))[0]
    sub.eval()
    with torch.no_grad(), at_coefficients(sub, coeffs[1]):
        out = sub(x)
    ref = export_coefficients(sub, coeffs[1]).eval()
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)


def test_segment_coefficients_equal_line_connect():
    """The curve's ends mixed linearly are Line.connect(ends): same weights."""
    a, b = tiny_net(0), tiny_net(1)
    sub = ss.Bezier.connect(a, b, degree=2)
    perturb(sub, 1)
    line = ss.Line.connect(a, b)
    curve_c, segment_c = curve_script.coefficients(sub, torch.tensor([0.0, 0.3, 1.0]))
    for i, t in enumerate([0.0, 0.3, 1.0]):
        got = dict(export_coefficients(sub, segment_c[i]).named_parameters())
        for name, p in line.export(t).named_parameters():
            torch.testing.assert_close(got[name], p, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(curve_c, sub.coefficients(torch.tensor([0.0, 0.3, 1.0])))


def test_bad_coefficients_and_points():
    sub = ss.Bezier.connect(tiny_net(0), tiny_net(1), degree=2)
    loader = tiny_data(16)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        evaluate_coefficients(sub, torch.ones(2, 4), loader)
    with pytest.raises(ValueError, match="outside"):
        point_coefficients(sub, [0.5, 1.5])
    with pytest.raises(ValueError, match="either"):
        evaluate_points(sub, loaders=loader)
    with pytest.raises(ValueError, match="names points"):
        evaluate_coefficients(sub, torch.eye(3), loader, ensembles=[[0, 3]])


def test_curve_length_of_a_segment():
    sub = ss.Bezier.connect(tiny_net(0), tiny_net(1), degree=2)   # interior anchor on the segment
    d = math.sqrt(sum(float(((p1 - p0) ** 2).sum()) for p0, p1 in zip(sub.anchor_parameters(0), sub.anchor_parameters(2))))
    assert abs(integrate_speed(sub) - d) < 1e-4 * d


# --------------------------------------------------------------------------- plane geometry
def test_plane_basis_orthonormal_and_points(runs):
    from subspaces.io import load_subspace

    sub = load_subspace(runs["connect"])
    basis = plane_script.plane_basis(sub)
    flat = [torch.cat([p.detach().double().reshape(-1) for p in sub.anchor_parameters(k)]) for k in range(3)]
    W = torch.stack(flat)                       # [3, P] in (A, THETA, B) order
    u, v = basis["u"] @ W, basis["v"] @ W
    assert abs(float(u @ u) - 1) < 1e-9 and abs(float(v @ v) - 1) < 1e-9 and abs(float(u @ v)) < 1e-9
    torch.testing.assert_close(u, (W[2] - W[0]) / (W[2] - W[0]).norm())
    for key, k in (("A", 0), ("THETA", 1), ("B", 2)):
        x, y = basis[key]
        d = W[k] - W[0]
        assert abs(float(d @ u) - x) < 1e-6 * max(1.0, abs(x)) and abs(float(d @ v) - y) < 1e-6 * max(1.0, abs(y))
        # the grid's coefficient vector at the point's coordinates is the point itself
        c = plane_script.grid_coefficients(basis, torch.tensor([x], dtype=torch.float64), torch.tensor([y], dtype=torch.float64))
        torch.testing.assert_close(c[0], torch.eye(3, dtype=torch.float64)[k], atol=1e-9, rtol=0)
        px, py = plane_script.project(basis, torch.eye(3, dtype=torch.float64)[k : k + 1])
        assert abs(float(px) - x) < 1e-9 and abs(float(py) - y) < 1e-9
    assert basis["A"] == (0.0, 0.0) and basis["B"][1] == 0.0 and basis["THETA"][1] > 0
    assert abs(basis["B"][0] - float((W[2] - W[0]).norm())) < 1e-6


def test_plane_rejects_collinear():
    sub = ss.Bezier.connect(tiny_net(0), tiny_net(1), degree=2)   # theta on the segment
    with pytest.raises(ValueError, match="span no plane"):
        plane_script.plane_basis(sub)


# --------------------------------------------------------------------------- scripts end to end
def _outputs(png: Path) -> dict:
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(png.with_suffix(".json").read_text())


def test_curve_script(runs, tmp_path):
    png = tmp_path / "curve.png"
    assert curve_script.main([str(runs["connect"]), "--points", "3", "--output", str(png), *FAST]) == 0
    data = _outputs(png)
    assert data["t"] == pytest.approx([0, 0.5, 1])
    for path in ("curve", "segment"):
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            assert len(data[path][key]) == 3
    # both paths share their ends
    assert data["curve"]["test_error"][0] == data["segment"]["test_error"][0]
    assert data["curve"]["train_loss"][-1] == data["segment"]["train_loss"][-1]
    s = data["summary"]
    assert s["curve_length"] >= s["segment_length"] * (1 - 1e-6) > 0
    assert data["train_count"] == 16 and data["test_count"] == 16
    for path in ("curve", "segment"):   # the barrier at the midpoint: its rise above the ends' chord
        for key in ("train_loss", "test_error"):
            b, v = s[path]["barriers"][key], data[path][key]
            rise = v[1] - (v[0] + v[2]) / 2
            assert b["height"] == pytest.approx(max(rise, 0.0), abs=1e-12) and b["ends"] == pytest.approx([v[0], v[2]])


def test_plane_script_run_and_files(runs, tmp_path):
    png = tmp_path / "plane.png"
    assert plane_script.main([str(runs["chain"]), "--grid", "2", "--metrics", "test_error", "--output", str(png), *FAST]) == 0
    data = _outputs(png)
    assert len(data["values"]["test_error"]) == 2 and len(data["values"]["test_error"][0]) == 2
    assert data["curve"]["x"][50] == pytest.approx(data["points"]["THETA"][0])   # the chain bends at theta
    m = runs["models"]
    png2 = tmp_path / "files.png"
    args = [str(m / "A.safetensors"), str(m / "THETA.safetensors"), str(m / "B.safetensors"), "--grid", "2",
            "--metrics", "train_loss", "test_error", "--margin", "0", "--output", str(png2), *FAST]
    assert plane_script.main(args) == 0
    data2 = _outputs(png2)
    assert set(data2["values"]) == {"train_loss", "test_error"}
    # margin 0: the grid corners are A and B
    assert data2["x"][0] == pytest.approx(0, abs=1e-9) and data2["y"][0] == pytest.approx(0, abs=1e-9)
    assert data2["values"]["test_error"][0][0] == pytest.approx(data2["at_points"]["test_error"]["A"])


def test_line_script(runs, tmp_path):
    png = tmp_path / "line.png"
    assert line_script.main([str(runs["line"]), "--points", "3", "--output", str(png), *FAST]) == 0
    data = _outputs(png)
    assert data["alpha"] == pytest.approx([0, 0.5, 1])
    assert data["pair_alpha"] == pytest.approx([0, 0.5])
    # the "pair" at alpha = 0.5 is the midpoint alone
    assert data["pair_acc"][1] == pytest.approx(data["acc"][1])


@pytest.mark.parametrize("script,argv,message", [
    ("curve", ["{root}/missing"], "does not exist"),
    ("curve", ["{plain}"], "no subspace.safetensors"),
    ("curve", ["{line}", "--points", "1"], "--points"),
    ("curve", ["{connect}", "--bn-batches", "0"], "--bn-batches"),
    ("plane", ["{connect}", "{connect}"], "one connect run folder or three"),
    ("plane", ["{line}"], "degree-2 Bezier"),
    ("line", ["{connect}"], "not a line"),
])
def test_bad_input_is_one_line(runs, capsys, script, argv, message):
    mod = {"curve": curve_script, "plane": plane_script, "line": line_script}[script]
    argv = [a.format(**{k: str(v) for k, v in runs.items()}) for a in argv]
    assert mod.main([*FAST, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_help_runs(capsys):
    for mod in (curve_script, plane_script, line_script):
        with pytest.raises(SystemExit) as exc:
            mod.main(["--help"])
        assert exc.value.code == 0
    assert "Gram-Schmidt" in capsys.readouterr().out
