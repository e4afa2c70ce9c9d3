"""The comparison's evaluation: each member predicts where it trained, the replicate averages.

A member's worker process, after training, evaluates every network the member contributes to
the table (an Ind network; the FGE / SSE snapshots and the SWA averages; points of a line or a
simplex; samples of a SPRO simplex), each with BatchNorm recomputed at its own weights on
unaugmented training images, and writes their probabilities on the validation split and the
test split to ``member/predictions.safetensors`` (float32 [N, C] per network).

The main process then builds each row of the table at each budget by averaging those
probabilities (ensembles average probabilities, never logits), computes the metrics, and writes
the replicate's ``predictions.safetensors``: per split its ``labels`` and, per row and budget,
the probabilities (float32) from which every number of the table and every claim is computed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .bn import update_bn
from .compare_plan import OFFSETS, Plan
from .data import DataBundle, make_loader, split_targets
from .ensembles import subspace_points
from .io import load_model, load_subspace
from .metrics import metrics_from_probs
from .snapshots import list_snapshots, swa_average

#: the file of a member's network probabilities, and of a replicate's row probabilities
PREDICTIONS = "predictions.safetensors"
#: the splits every row is evaluated on: the validation split (held out of training) and the test split
SPLITS = ("val", "test")
METRICS = ("acc", "nll", "ece", "brier")


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable) -> Tensor:
    """softmax(model(x)) over the loader in eval mode: [N, C] float32 on the CPU, in the loader's order."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, _ in loader:
            logits = model(x)
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def split_loaders(data: DataBundle, batch_size: int) -> dict[str, Any]:
    """The unaugmented loaders of the evaluated splits: ``val`` (the held-out split, when there is
    one) and ``test``."""
    loaders = {"test": make_loader(data.eval, batch_size, shuffle=False)}
    if data.holdout is not None:
        loaders["val"] = make_loader(data.holdout, batch_size, shuffle=False)
    return loaders


def split_labels(data: DataBundle) -> dict[str, Tensor]:
    """The labels of each evaluated split: ``{split: [N] int64}``."""
    out = {"test": split_targets(data.eval)}
    if data.holdout is not None:
        out["val"] = split_targets(data.holdout)
    return out


def point_key(point: Tensor) -> str:
    """A network's name from its point: ``t=0.2500`` on a curve, ``p=0.3333,...`` on a simplex."""
    p = torch.as_tensor(point).flatten()
    if p.numel() == 1:
        return f"t={float(p):.4f}"
    return "p=" + ",".join(f"{float(v):.4f}" for v in p)


def draw_seed(kind: str, replicate_seed: int, index: int) -> int:
    """The seed of the random points a replicate evaluates on a shape (``kind`` "simplex": the
    simplex trained at budget ``index``; "espro": the SPRO simplex of Ind network ``index``)."""
    return int(replicate_seed) + OFFSETS[kind] + int(index)


def member_networks(name: str, folder: Path, plan: Plan, samples: int, seed: int, bn: Any, bn_batches: int
                    ) -> Iterator[tuple[str, Callable[[], nn.Module]]]:
    """The networks member ``name`` (its run folder ``folder``) contributes to the table, as
    (key, factory) pairs, each factory returning the network with BatchNorm recomputed at its
    weights. ``seed`` is the replicate's seed (it seeds the random points of simplexes)."""
    def recomputed(path: Path) -> Callable[[], nn.Module]:
        return lambda: update_bn(load_model(path), bn, max_batches=bn_batches)

    def at(sub: Any, point: Any) -> Callable[[], nn.Module]:
        return lambda: sub.export(point, bn_loader=bn, bn_batches=bn_batches)

    top = max(plan.budgets)
    if name.startswith("ind"):
        yield "net", recomputed(folder / "model.safetensors")
    elif name in ("sse", "fge"):
        snaps = list_snapshots(folder)
        its = [s.iteration for s in snaps]
        count = (lambda k: plan.fge_count(k, its)) if name == "fge" else (lambda k: plan.sse_count(k, its))
        for s in snaps[:count(top)]:   # saved with BatchNorm recomputed at their weights
            yield f"snapshot{s.iteration}", (lambda path=s.path: load_model(path))
        if name == "fge" and "swa" in plan.methods:
            for k in plan.budgets:
                if count(k):
                    paths = [s.path for s in snaps[:count(k)]]
                    yield f"swa{k}B", (lambda paths=paths: swa_average(paths, bn, bn_batches))
    elif name.startswith("spro"):
        j = int(name[4:])
        sim = load_subspace(folder / f"vertex{plan.espro_vertices - 1}")
        gen = torch.Generator().manual_seed(draw_seed("espro", seed, j))
        for i, p in enumerate(subspace_points(sim, "random", samples, gen)):
            yield f"sample{i}", at(sim, p)
    elif name.startswith(("line", "layerwise")):
        line = load_subspace(folder)
        ts = [0.0, 0.5, 1.0] if name.startswith("layerwise") else sorted({*(float(t) for t in subspace_points(line, "even", samples)), 0.5})
        for t in ts:
            yield point_key(torch.tensor(t)), at(line, t)
    elif name.startswith("simplex"):
        k = int(name[len("simplex"):-1])
        sim = load_subspace(folder)
        yield "centre", at(sim, None)
        for i, p in enumerate(subspace_points(sim, "ends")):
            yield f"vertex{i}", at(sim, p)
        gen = torch.Generator().manual_seed(draw_seed("simplex", seed, k))
        for i, p in enumerate(subspace_points(sim, "random", samples, gen)):
            yield f"sample{i}", at(sim, p)
    else:
        raise ValueError(f"unknown compare member {name!r}")


def evaluate_member(name: str, folder: Path, plan: Plan, data: DataBundle, *, samples: int, seed: int, batch_size: int,
                    eval_batch_size: int, bn_batches: int) -> Path:
    """Predict every network of member ``name`` on the validation and test splits and write
    ``folder/predictions.safetensors`` (keys ``split/network``, float32 [N, C]); returns its path."""
    bn = make_loader(data.bn, batch_size, shuffle=False)
    loaders = split_loaders(data, eval_batch_size)
    tensors: dict[str, Tensor] = {}
    for key, make in member_networks(name, folder, plan, samples, seed, bn, bn_batches):
        net = make()
        for split, loader in loaders.items():
            tensors[f"{split}/{key}"] = predict(net, loader).contiguous()
        del net
    path = folder / PREDICTIONS
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)   # the file is the member's "evaluated" marker: written whole or not at all
    return path


# ---------------------------------------------------------------------------------------- the replicate
class Rows:
    """The rows of one replicate's table as probabilities: ``probs[split][(row, k)]`` is
    [M, N, C] float32, M = 1 for a network or an ensemble (already averaged) and M > 1 for
    "Single network" (the Ind networks, each alone: its metrics are their mean); ``members`` and
    ``cost`` per (row, k)."""

    def __init__(self) -> None:
        self.probs: dict[str, dict[tuple[str, int], Tensor]] = {}
        self.members: dict[tuple[str, int], int] = {}
        self.cost: dict[tuple[str, int], float] = {}

    def put(self, row: str, k: int, split_probs: dict[str, Tensor], members: int, cost: float) -> None:
        for split, p in split_probs.items():
            self.probs.setdefault(split, {})[(row, k)] = p if p.ndim == 3 else p[None]
        self.members[(row, k)] = members
        self.cost[(row, k)] = cost

    def keys(self) -> list[tuple[str, int]]:
        return list(self.members)


def replicate_rows(plan: Plan, samples: int, root: Path) -> Rows:
    """Every row of the table at every budget from the members' saved predictions under ``root``
    (one replicate): the averages of :func:`evaluate_member`'s probabilities."""
    loaded: dict[str, dict[str, Tensor]] = {}

    def nets(member: str) -> dict[str, Tensor]:
        if member not in loaded:
            loaded[member] = load_file(str(root / member / PREDICTIONS))
        return loaded[member]

    def mean(member_keys: list[tuple[str, str]]) -> dict[str, Tensor]:
        """{split: average of the named networks' probabilities}; member_keys: (member, network)."""
        splits = sorted({k.split("/", 1)[0] for k in nets(member_keys[0][0])})
        out = {}
        for split in splits:
            total = None
            for member, key in member_keys:
                p = nets(member)[f"{split}/{key}"]
                total = p.clone() if total is None else total + p
            out[split] = total / len(member_keys)  # type: ignore[operator]
        return out

    rows = Rows()
    top = max(plan.budgets)
    for k in plan.budgets:
        rows.put("Ind", k, mean([(f"ind{j}", "net") for j in range(k)]), k, plan.cost("Ind", k))
    single = {split: torch.stack([nets(f"ind{j}")[f"{split}/net"] for j in range(top)]) for split in SPLITS if f"{split}/net" in nets("ind0")}
    rows.put("Single network", 1, single, 1, 1.0)
    for method in ("sse", "fge"):
        if method not in plan.methods:
            continue
        its = [s.iteration for s in list_snapshots(root / method)]
        for k in plan.budgets:
            n = plan.fge_count(k, its) if method == "fge" else plan.sse_count(k, its)
            if n == 0:
                continue
            rows.put(method.upper(), k, mean([(method, f"snapshot{i}") for i in its[:n]]), n, plan.cost(method.upper(), k))
            if method == "fge" and "swa" in plan.methods:
                rows.put("SWA", k, mean([("fge", f"swa{k}B")]), n, plan.cost("SWA", k))
    for k in plan.subspace_budgets:
        if "line" in plan.methods:
            m = f"line{k}B"
            even = [point_key(t) for t in torch.linspace(0.0, 1.0, samples)] if samples > 1 else [point_key(torch.tensor(0.5))]
            rows.put("Line midpoint", k, mean([(m, "t=0.5000")]), 1, float(k))
            rows.put("Line endpoints (ens.)", k, mean([(m, "t=0.0000"), (m, "t=1.0000")]), 2, float(k))
            rows.put(f"Line {samples} points (ens.)", k, mean([(m, key) for key in even]), samples, float(k))
        if "layerwise" in plan.methods:
            m = f"layerwise{k}B"
            rows.put("Line (layerwise) midpoint", k, mean([(m, "t=0.5000")]), 1, float(k))
            rows.put("Line (layerwise) endpoints (ens.)", k, mean([(m, "t=0.0000"), (m, "t=1.0000")]), 2, float(k))
        if "simplex" in plan.methods:
            m = f"simplex{k}B"
            keys = nets(m)
            vertices = sorted({key.split("/", 1)[1] for key in keys if key.split("/", 1)[1].startswith("vertex")})
            rows.put("Simplex centre", k, mean([(m, "centre")]), 1, float(k))
            rows.put("Simplex vertices (ens.)", k, mean([(m, v) for v in vertices]), len(vertices), float(k))
            rows.put(f"Simplex {samples} samples (ens.)", k, mean([(m, f"sample{i}") for i in range(samples)]), samples, float(k))
    if "espro" in plan.methods:
        for k in plan.budgets:
            rows.put("ESPRO", k, mean([(f"spro{j}", f"sample{i}") for j in range(k) for i in range(samples)]), k * samples,
                     plan.cost("ESPRO", k))
    return rows


def row_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Metrics of a row's [M, N, C] probabilities: of the network / ensemble when M = 1, the mean
    of the M networks' own metrics otherwise."""
    per = [metrics_from_probs(p, labels) for p in probs]
    return {key: statistics.fmean(float(m[key]) for m in per) for key in METRICS}


def per_example_losses(probs: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per test example losses of a row's [M, N, C] probabilities, averaged over its M networks:
    ``error`` (points: 100 x 1[argmax != label]) and ``nll`` (-log p_label); each [N] float64."""
    p = probs.double()
    wrong = (p.argmax(dim=-1) != labels[None]).double() * 100.0
    nll = -p.gather(-1, labels[None, :, None].expand(p.shape[0], -1, 1)).squeeze(-1).clamp_min(torch.finfo(torch.float32).tiny).log()
    return {"error": wrong.mean(dim=0), "nll": nll.mean(dim=0)}


def save_replicate_predictions(rows: Rows, labels: dict[str, Tensor], path: Path) -> None:
    """The replicate's ``predictions.safetensors``: ``split/labels`` (int64 [N]) and
    ``split/ROW@kB`` (float32 [N, C], or [M, N, C] for "Single network"), names as in results.csv.
    float32, not float16: an overconfident network's true-class probability below float16's
    smallest value (6e-8) would round to 0, and the NLL recomputed from the file would differ from
    the table's (by 0.013 nats on a 5,000-image validation split, from one such image)."""
    tensors: dict[str, Tensor] = {}
    for split, by_row in rows.probs.items():
        tensors[f"{split}/labels"] = labels[split].to(torch.int64).contiguous()
        for (row, k), p in by_row.items():
            tensors[f"{split}/{row}@{k}B"] = (p[0] if p.shape[0] == 1 else p).to(torch.float32).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_replicate_predictions(path: Path) -> tuple[dict[str, Tensor], dict[str, dict[tuple[str, int], Tensor]]]:
    """Read a replicate's ``predictions.safetensors`` (:func:`save_replicate_predictions`):
    ``({split: labels [N]}, {split: {(row, k): [M, N, C] float32}})``."""
    labels: dict[str, Tensor] = {}
    rows: dict[str, dict[tuple[str, int], Tensor]] = {}
    for key, value in load_file(str(path)).items():
        split, name = key.split("/", 1)
        if name == "labels":
            labels[split] = value
            continue
        row, budget = name.rsplit("@", 1)
        p = value.float()
        rows.setdefault(split, {})[(row, int(budget.removesuffix("B")))] = p if p.ndim == 3 else p[None]
    return labels, rows
