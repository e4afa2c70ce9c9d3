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
Which networks a member contributes and which rows a method builds from them are the method's
(:mod:`subspaces.method_registry`, :mod:`subspaces.methods`); rows are keyed by their
identifiers here and shown by their display names in the files.
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
from .compare_plan import Plan, in_table_order
from .data import DataBundle, make_loader, split_targets
from .io import load_model
from .method_registry import find_member, get_method, row_display
from .methods.common import draw_seed, point_key
from .metrics import metrics_from_probs
from .models import channels_last_input, use_channels_last

__all__ = ["PREDICTIONS", "SPLITS", "NetworkContext", "RowBuilder", "Rows", "draw_seed", "evaluate_member", "load_replicate_predictions",
           "member_networks", "per_example_losses", "point_key", "predict", "replicate_rows", "row_metrics", "save_replicate_predictions",
           "split_labels", "split_loaders"]

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


class NetworkContext:
    """What a method's :meth:`~subspaces.method_registry.CompareMethod.networks` gets: the
    member's run ``folder``, the ``plan``, ``samples`` (points per subspace ensemble), the
    replicate's ``seed`` (it seeds the random points of simplexes), and the BatchNorm loader
    ``bn`` with ``bn_batches``; :meth:`recomputed` and :meth:`at` make the factories."""

    def __init__(self, folder: Path, plan: Plan, samples: int, seed: int, bn: Any, bn_batches: int) -> None:
        self.folder, self.plan, self.samples, self.seed, self.bn, self.bn_batches = folder, plan, samples, seed, bn, bn_batches

    def recomputed(self, path: Path) -> Callable[[], nn.Module]:
        """The saved network at ``path`` with BatchNorm recomputed at its weights."""
        return lambda: update_bn(load_model(path), self.bn, max_batches=self.bn_batches)

    def at(self, sub: Any, point: Any) -> Callable[[], nn.Module]:
        """The network at ``point`` of subspace ``sub`` (None: its centre), BatchNorm recomputed."""
        return lambda: sub.export(point, bn_loader=self.bn, bn_batches=self.bn_batches)


def member_networks(name: str, folder: Path, plan: Plan, samples: int, seed: int, bn: Any, bn_batches: int
                    ) -> Iterator[tuple[str, Callable[[], nn.Module]]]:
    """The networks member ``name`` (its run folder ``folder``) contributes to the table, as
    (key, factory) pairs, each factory returning the network with BatchNorm recomputed at its
    weights: those of the plan's method that trains it. ``seed`` is the replicate's seed (it seeds
    the random points of simplexes); ValueError for a member no method of the plan trains."""
    entry, member = find_member(plan.methods, plan, name)
    return entry.method.networks(member, NetworkContext(folder, plan, samples, seed, bn, bn_batches))


def evaluate_member(name: str, folder: Path, plan: Plan, data: DataBundle, *, samples: int, seed: int, batch_size: int,
                    eval_batch_size: int, bn_batches: int, channels_last: bool = False) -> Path:
    """Predict every network of member ``name`` on the validation and test splits and write
    ``folder/predictions.safetensors`` (keys ``split/network``, float32 [N, C]); returns its path.
    The splits' batches are loaded once for all the member's networks; ``channels_last``: each
    network (after its BatchNorm is recomputed) and the batches in that layout (same values)."""
    bn = make_loader(data.bn, batch_size, shuffle=False)
    layout = channels_last_input if channels_last else (lambda x: x)
    batches = {split: [(layout(x), y) for x, y in loader] for split, loader in split_loaders(data, eval_batch_size).items()}
    tensors: dict[str, Tensor] = {}
    for key, make in member_networks(name, folder, plan, samples, seed, bn, bn_batches):
        net = make()
        if channels_last:
            use_channels_last(net)
        for split, split_batches in batches.items():
            tensors[f"{split}/{key}"] = predict(net, split_batches).contiguous()
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
    ``cost`` per (row, k); ``row`` is the row's identifier and ``names[row]`` its display name."""

    def __init__(self) -> None:
        self.probs: dict[str, dict[tuple[str, int], Tensor]] = {}
        self.members: dict[tuple[str, int], int] = {}
        self.cost: dict[tuple[str, int], float] = {}
        self.names: dict[str, str] = {}

    def put(self, row: str, k: int, split_probs: dict[str, Tensor], members: int, cost: float, name: str | None = None) -> None:
        for split, p in split_probs.items():
            self.probs.setdefault(split, {})[(row, k)] = p if p.ndim == 3 else p[None]
        self.members[(row, k)] = members
        self.cost[(row, k)] = cost
        self.names.setdefault(row, row if name is None else name)

    def keys(self) -> list[tuple[str, int]]:
        return list(self.members)

    def shown(self, split: str) -> dict[tuple[str, int], Tensor]:
        """``probs[split]`` keyed by (display name, k), the files' names."""
        return {(self.names[row], k): p for (row, k), p in self.probs.get(split, {}).items()}


class RowBuilder:
    """What a method's :meth:`~subspaces.method_registry.CompareMethod.build_rows` gets: the
    replicate's folder ``root``, ``samples``, the evaluated ``splits``; :meth:`nets` reads a
    member's saved probabilities, :meth:`mean` averages networks' probabilities and :meth:`put`
    stores a row (by its identifier; its display name comes from its method's declaration)."""

    splits = SPLITS

    def __init__(self, root: Path, samples: int) -> None:
        self.root, self.samples, self.rows = root, samples, Rows()
        self.loaded: dict[str, dict[str, Tensor]] = {}

    def nets(self, member: str) -> dict[str, Tensor]:
        """Member ``member``'s saved probabilities: ``{"split/network": [N, C]}``."""
        if member not in self.loaded:
            self.loaded[member] = load_file(str(self.root / member / PREDICTIONS))
        return self.loaded[member]

    def mean(self, member_keys: list[tuple[str, str]]) -> dict[str, Tensor]:
        """{split: average of the named networks' probabilities}; member_keys: (member, network)."""
        splits = sorted({k.split("/", 1)[0] for k in self.nets(member_keys[0][0])})
        out = {}
        for split in splits:
            total = None
            for member, key in member_keys:
                p = self.nets(member)[f"{split}/{key}"]
                total = p.clone() if total is None else total + p
            out[split] = total / len(member_keys)  # type: ignore[operator]
        return out

    def put(self, row: str, k: int, split_probs: dict[str, Tensor], members: int, cost: float) -> None:
        """Store row ``row`` (an identifier its method declares) at budget kB."""
        self.rows.put(row, k, split_probs, members, cost, row_display(row, self.samples))


def replicate_rows(plan: Plan, samples: int, root: Path) -> Rows:
    """Every row of the table at every budget from the members' saved predictions under ``root``
    (one replicate): the averages of :func:`evaluate_member`'s probabilities, built by each
    method of the plan in the table's order."""
    builder = RowBuilder(root, samples)
    for name in in_table_order(plan.methods):
        get_method(name).method.build_rows(plan, builder)
    return builder.rows


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
            tensors[f"{split}/{rows.names[row]}@{k}B"] = (p[0] if p.shape[0] == 1 else p).to(torch.float32).contiguous()
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
