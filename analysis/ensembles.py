"""Ensembles of a compare run (recipes/compare.py): error and NLL against ensemble size and budget, and calibration.

Reads the output folder of recipes/compare.py (``protocol.json``, ``results.json``,
``seedR/evaluation.json`` and the member run folders ``seedR/ind0..``, ``fge``, ``sse``, ``line1B``,
``simplex1B``, ``spro0..``; ``seedR/logs`` and ``.claims`` are not members) and draws three rows of
panels:

1. test error and NLL of the ensemble of the first k members, k = 1..M, for every ensemble method
   of replicate ``--seed R`` (default 0), in the compare's member order: Ind (ind0, ind1, ...), SSE
   and FGE (snapshot order, up to the largest budget), the line's evenly spaced points (t = 0 .. 1),
   the simplex's Dirichlet samples and ESPRO's samples (``--samples`` Dirichlet draws from the
   SPRO simplex of each Ind network j in turn: ESPRO(k) is the first k x samples); the draws are
   the compare's. Each method is ONE pass over the data (``evaluate(..., per_member=True)``:
   ``by_size``, and ``members`` for "Single network", the mean of the Ind networks' own metrics).
   Every network has its BatchNorm recomputed at its own weights first, the Ind networks
   included, as in the compare. SWA (one network: the average of the first n FGE snapshots) is
   drawn at n; the line midpoint / simplex centre at 1, the line endpoints at 2, the simplex
   vertices at their number. Budgets (1B, 2B, 3B) are marked on the Ind / SSE / FGE / ESPRO curves.
2. test error and NLL against the budget (1B, 2B, 3B) from the compare's results (all replicates:
   mean +- std as error bars), each cell at its training cost (k x B, ESPRO's SPRO epochs added).
3. reliability diagrams (15 equal-width confidence bins: accuracy per bin, its gap to the
   confidence, ECE) of the best single network and the best ensemble: the lowest mean test error of
   the compare at the largest budget, among single networks and among ensembles; computed from the
   probabilities of replicate R.

The evaluation set is the compare's own (its --eval-subset, --seed, BatchNorm batches and points)
unless --eval-subset says otherwise; the recomputed numbers are checked against the compare's
``evaluation.json`` (``check`` in the JSON).

    python analysis/ensembles.py                                   # runs/compare -> runs/compare/ensembles.png + .json
    python analysis/ensembles.py runs/compare3 --seed 1 --threads 1 --output docs/ensembles.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


import common  # noqa: E402  (the sibling module, found because a script's own folder is searched first)
from subspaces.errors import ConfigError  # noqa: E402

N_BINS = 15
#: compare rows that are one network (the others average members' probabilities)
SINGLE_ROWS = ("Single network", "SWA", "Line midpoint", "Simplex centre")
#: the method families, in the order their rows' names are matched (a row starts with its family)
FAMILIES = ("Ind", "SSE", "FGE", "SWA", "Line", "Simplex", "ESPRO")
COLORS = {"Single": "0.35", "Ind": "C0", "SSE": "C1", "FGE": "C2", "SWA": "C3", "Line": "C4", "Simplex": "C5", "ESPRO": "C6"}
#: size curves that are one of the compare's rows at every budget (curve name = row), marked at its budgets
BUDGET_CURVES = ("Ind", "SSE", "FGE", "ESPRO")
METRICS = ("acc", "nll", "ece", "brier")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ensembles.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compare_dir", nargs="?", default="runs/compare",
                   help="output folder of recipes/compare.py (default: %(default)s, the compare's own default)")
    p.add_argument("-c", "--config", default=None, help="YAML file with the same keys as these flags")
    p.add_argument("--seed", type=int, default=0,
                   help="replicate R (folder seedR) for the size curves and reliability diagrams (default: %(default)s)")
    p.add_argument("--eval-subset", type=eval_subset_arg, default=None,
                   help="test examples to evaluate, or 'all' (default: the compare's own --eval-subset)")
    p.add_argument("--output", default=None, help="PNG to write; the JSON goes beside it (default: COMPARE_DIR/ensembles.png)")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="evaluation batch size (default: the compare's --eval-batch-size)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the compare's, else $SUBSPACES_DATA or the cache)")
    p.add_argument("-j", "--workers", type=int, default=0, help="data loader worker processes (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the accelerator if there is one)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; 1 is much faster on a CPU shared with other jobs)")
    return p


def eval_subset_arg(value: str) -> int:
    """``--eval-subset``: a positive number of examples, or ``all`` (0)."""
    return common.subset_arg(value) or 0


def int_list(text: Any, what: str) -> list[int]:
    """The sorted distinct positive whole numbers of a protocol's comma-separated list (``budgets``,
    ``subspace_budgets``); ConfigError if it is not one."""
    try:
        values = sorted({int(v) for v in str(text).replace(" ", "").split(",") if v})
    except ValueError:
        raise ConfigError(f"protocol.json: {what} {text!r} is not a comma-separated list of whole numbers: is the compare run intact?") from None
    if not values or values[0] < 1:
        raise ConfigError(f"protocol.json: {what} {text!r} holds no positive multiples of B: is the compare run intact?")
    return values


# ------------------------------------------------------------------------------------ the compare folder
@dataclass
class Compare:
    root: Path
    protocol: dict[str, Any]
    config: dict[str, Any]
    budgets: list[int]
    seeds: list[int]                    # the replicates' seeds (results.json), else derived
    table: dict[str, dict[str, Any]]    # row -> "kB" -> mean / std over replicates
    replicates: int                     # replicates behind the table
    title: str
    table_source: str
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)   # replicate R's evaluation


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}): is the compare run intact?") from None


def open_compare(folder: str, replicate: int) -> Compare:
    """The compare run in ``folder`` with replicate ``replicate`` evaluated; ConfigError if it is not one."""
    from subspaces.compare import SEED_STRIDE, aggregate
    from subspaces.run_folder import read_config

    root = Path(folder)
    if not root.exists():
        raise ConfigError(f"{root} does not exist: pass the --output folder of recipes/compare.py (default runs/compare)")
    if not root.is_dir() or not (root / "protocol.json").is_file():
        raise ConfigError(f"{root} is not a compare run (no protocol.json): pass the --output folder of recipes/compare.py")
    protocol = _read_json(root / "protocol.json")
    if not isinstance(protocol, dict) or "budgets" not in protocol or "seed" not in protocol:
        raise ConfigError(f"{root / 'protocol.json'} is not the protocol of a compare run (no budgets / seed)")
    config: dict[str, Any] = {}
    if (root / "config.yaml").is_file():
        try:
            loaded = read_config(str(root / "config.yaml"))
            config = loaded if isinstance(loaded, dict) else {}
        except Exception:   # the job's settings only give defaults (batch size, data folder)
            config = {}
    if replicate < 0:
        raise ConfigError(f"--seed {replicate}: the replicate index must be >= 0 (seed0, seed1, ...)")
    evaluated = sorted(int(p.parent.name[4:]) for p in root.glob("seed*/evaluation.json") if p.parent.name[4:].isdigit())
    if not evaluated:
        raise ConfigError(f"{root} has no evaluated replicate (no seedR/evaluation.json): let recipes/compare.py finish first")
    if replicate not in evaluated:
        have = ", ".join(str(r) for r in evaluated)
        raise ConfigError(f"--seed {replicate}: {root} has no evaluated replicate {replicate} (seed{replicate}/evaluation.json); "
                          f"evaluated: {have}")
    per_seed = {r: _read_json(root / f"seed{r}" / "evaluation.json").get("evaluation") for r in evaluated}
    for r, rep in per_seed.items():
        if not isinstance(rep, dict) or not isinstance(rep.get("rows"), dict):
            raise ConfigError(f"{root / f'seed{r}' / 'evaluation.json'} holds no evaluation rows: is the compare run intact?")
    results = _read_json(root / "results.json") if (root / "results.json").is_file() else None
    if results and isinstance(results.get("table"), dict):
        budgets = [int(k) for k in results.get("plan", {}).get("budgets") or int_list(protocol["budgets"], "budgets")]
        table, source = results["table"], "results.json"
        seeds = list(results.get("seeds") or [])
        replicates = len(results.get("per_seed") or []) or len(evaluated)
        title = results.get("title") or ""
    else:   # a compare still running its later replicates: the replicates evaluated so far
        budgets = int_list(protocol["budgets"], "budgets")
        table = aggregate([per_seed[r] for r in evaluated], budgets)
        source = f"seed{{{','.join(str(r) for r in evaluated)}}}/evaluation.json (no results.json yet)"
        seeds, replicates, title = [], len(evaluated), ""
    if not seeds:
        seeds = [int(protocol["seed"]) + SEED_STRIDE * r for r in range(max(evaluated) + 1)]
    title = title or f"{protocol.get('model')} on {protocol.get('dataset')}: equal-budget comparison, B = {protocol.get('epochs')} epochs"
    return Compare(root=root, protocol=protocol, config=config, budgets=budgets, seeds=seeds, table=table, replicates=replicates,
                   title=title, table_source=source, rows=per_seed[replicate]["rows"])


# ------------------------------------------------------------------------------------ one pass per method
@dataclass
class Pass:
    """One ensemble evaluated in one pass over the data: its members (paths, modules or factories),
    the prefix length that forms its size curve (0: none), the compare rows it holds (row, "kB") ->
    member indices averaged, budget marks on the curve ("kB" -> prefix size), and the row whose
    metrics are the mean over its members of each member's own metrics, m = (1/M) sum_j m(p_j)
    (``alone``: the compare's "Single network", from the Ind pass)."""

    name: str
    members: list[Any]
    curve: int
    subsets: dict[tuple[str, str], list[int]]
    marks: dict[str, int] = field(default_factory=dict)
    family: str = ""
    alone: tuple[str, str] | None = None


def _recording_ensemble(members: list[Any], subsets: dict[tuple[str, str], list[int]]):
    """An Ensemble that also keeps, batch by batch, the averaged probabilities of the given member subsets."""
    import torch

    from subspaces.ensembles import Ensemble
    from subspaces.io import load_model

    class Recording(Ensemble):
        def __init__(self) -> None:
            super().__init__(members, load_fn=load_model)
            self.index = {key: torch.tensor(idx) for key, idx in subsets.items()}
            self.records: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in subsets}

        def forward_members(self, x):   # [M, B, C]
            probs = super().forward_members(x)
            for key, idx in self.index.items():
                self.records[key].append(probs[idx.to(probs.device)].mean(dim=0).float().cpu())
            return probs

    return Recording()


class Tracked:
    """The evaluation loader, advancing a progress task per batch and keeping the labels of the first pass."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.labels: list[Any] = []
        self.bar: Any = None
        self.task: Any = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        keep = not self.labels
        for batch in self.loader:
            if keep:
                self.labels.append(batch[1])
            yield batch
            if self.bar is not None:
                self.bar.advance(self.task)


def plan_passes(cmp: Compare, seed_dir: Path, bn_loader: Any, bn_batches: int, device: Any) -> list[Pass]:
    """The passes of replicate R, in the compare's member order (what ``evaluate_replicate`` evaluated).

    Every member has its BatchNorm recomputed at its own weights on ``bn_batches`` batches of
    ``bn_loader`` before it is evaluated: the Ind networks on loading, the subspace points on
    export, SWA after averaging (the snapshots were saved so by their runs).
    """
    import torch

    from subspaces.bn import update_bn
    from subspaces.compare import SEED_STRIDE
    from subspaces.compare_eval import draw_seed
    from subspaces.ensembles import subspace_points
    from subspaces.io import load_model, load_subspace
    from subspaces.snapshots import list_snapshots, swa_average

    rows = cmp.rows
    replicate_seed = int(cmp.protocol["seed"]) + SEED_STRIDE * int(seed_dir.name.removeprefix("seed"))

    def members_at(row: str) -> dict[str, int]:
        return {b: int(c["members"]) for b, c in sorted(rows.get(row, {}).items(), key=lambda kv: int(kv[0][:-1]))}

    passes: list[Pass] = []
    ind = members_at("Ind")
    if not ind:
        raise ConfigError(f"{seed_dir / 'evaluation.json'} has no Ind row: is it the evaluation of a compare run?")
    n = max(ind.values())
    subsets = {("Ind", b): list(range(k)) for b, k in ind.items()}   # Ind 1B: ind0, a single network
    recomputed = [lambda p=seed_dir / f"ind{j}" / "model.safetensors": update_bn(load_model(p).to(device), bn_loader, max_batches=bn_batches)
                  for j in range(n)]
    alone = ("Single network", "1B") if "1B" in rows.get("Single network", {}) else None
    passes.append(Pass("Ind", recomputed, n, subsets, dict(ind), "Ind", alone))
    for method in ("SSE", "FGE"):
        counts = members_at(method)
        if not counts:
            continue
        n = max(counts.values())
        snaps = list_snapshots(seed_dir / method.lower())
        if len(snaps) < n:
            raise ConfigError(f"{seed_dir / method.lower()} has {len(snaps)} snapshots; the compare evaluated {n}: is the run intact?")
        paths = [s.path for s in snaps[:n]]
        passes.append(Pass(method, paths, n, {(method, b): list(range(k)) for b, k in counts.items()}, dict(counts), method))
        if method == "FGE" and members_at("SWA"):
            swa = members_at("SWA")
            makers = [lambda k=k: swa_average(paths[:k], bn_loader, bn_batches) for k in swa.values()]
            passes.append(Pass("SWA", makers, 0, {("SWA", b): [i] for i, b in enumerate(swa)}, dict(swa), "SWA"))
    samples = int(cmp.protocol.get("samples", 5))
    for k in int_list(cmp.protocol.get("subspace_budgets", "1"), "subspace_budgets"):
        b = f"{k}B"
        if b in rows.get("Line midpoint", {}):
            line = load_subspace(seed_dir / f"line{k}B").to(device)
            ts = [float(t) for t in subspace_points(line, "even", samples)]
            points: list[Any] = [*ts, 0.5]
            makers = [lambda p=p, sub=line: sub.export(p, bn_loader=bn_loader, bn_batches=bn_batches) for p in points]
            subsets = {(f"Line {samples} points (ens.)", b): list(range(samples)), ("Line endpoints (ens.)", b): [0, samples - 1],
                       ("Line midpoint", b): [samples]}
            passes.append(Pass(f"Line {b}", makers, samples, subsets, {b: samples}, "Line"))
        if b in rows.get("Simplex centre", {}):
            sim = load_subspace(seed_dir / f"simplex{k}B").to(device)
            gen = torch.Generator().manual_seed(draw_seed("simplex", replicate_seed, k))   # the compare's draws
            draws = subspace_points(sim, "random", samples, gen)
            V = sim.num_anchors
            points = [*draws, None, *subspace_points(sim, "ends")]
            makers = [lambda p=p, sub=sim: sub.export(p, bn_loader=bn_loader, bn_batches=bn_batches) for p in points]
            subsets = {(f"Simplex {samples} samples (ens.)", b): list(range(samples)), ("Simplex centre", b): [samples],
                       ("Simplex vertices (ens.)", b): list(range(samples + 1, samples + 1 + V))}
            passes.append(Pass(f"Simplex {b}", makers, samples, subsets, {b: samples}, "Simplex"))
    espro = members_at("ESPRO")
    if espro:   # ESPRO(k): the samples of the SPRO simplexes of ind0 .. ind{k-1}, k x samples members
        n = max(espro.values())
        if n % samples or any(m % samples for m in espro.values()):
            raise ConfigError(f"{seed_dir / 'evaluation.json'}: ESPRO has {sorted(espro.values())} members, not multiples of the "
                              f"compare's {samples} samples per simplex: is the run intact?")
        V = espro_vertices(cmp.protocol, seed_dir)
        makers = []
        for j in range(n // samples):
            sim = load_subspace(seed_dir / f"spro{j}" / f"vertex{V - 1}").to(device)
            gen = torch.Generator().manual_seed(draw_seed("espro", replicate_seed, j))   # the compare's draws
            makers += [lambda p=p, sub=sim: sub.export(p, bn_loader=bn_loader, bn_batches=bn_batches)
                       for p in subspace_points(sim, "random", samples, gen)]
        passes.append(Pass("ESPRO", makers, n, {("ESPRO", b): list(range(m)) for b, m in espro.items()}, dict(espro), "ESPRO"))
    return passes


def espro_vertices(protocol: dict[str, Any], seed_dir: Path) -> int:
    """Vertices V of each ESPRO simplex (its final stage is ``spro{j}/vertex{V-1}``): the protocol's
    ``espro_vertices``, else the last stage folder of ``spro0``."""
    if protocol.get("espro_vertices") is not None:
        return int(protocol["espro_vertices"])
    stages = [int(p.name[6:]) for p in (seed_dir / "spro0").glob("vertex*") if p.name[6:].isdigit()]
    if not stages:
        raise ConfigError(f"{seed_dir / 'spro0'} has no SPRO stages (vertex1, ...): is the compare run intact?")
    return max(stages) + 1


# ------------------------------------------------------------------------------------ reliability
def reliability(probs: Any, labels: Any, n_bins: int = N_BINS) -> dict[str, Any]:
    """Top-label reliability diagram: ``n_bins`` equal-width confidence bins on [0, 1] (the last one
    closed), per bin the count, mean confidence, accuracy and gap (confidence - accuracy), and
    ECE = sum_b (n_b / N) |acc_b - conf_b|. probs [N, C], labels [N]."""
    import torch

    conf, pred = probs.max(dim=1)
    correct = (pred == labels.to(pred.device)).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, conf.double())
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, correct)
    safe = count.clamp_min(1)
    mean_conf, acc = conf_sum / safe, acc_sum / safe
    ece = float(((count / count.sum()) * (acc - mean_conf).abs()).sum())
    occupied = count > 0
    return {"n_bins": n_bins, "edges": edges.double().tolist(), "count": [int(c) for c in count.tolist()],
            "confidence": [float(c) if o else None for c, o in zip(mean_conf.tolist(), occupied.tolist())],
            "accuracy": [float(a) if o else None for a, o in zip(acc.tolist(), occupied.tolist())],
            "gap": [float(c - a) if o else None for c, a, o in zip(mean_conf.tolist(), acc.tolist(), occupied.tolist())],
            "ece": ece, "mean_confidence": float(conf.double().mean()), "accuracy_overall": float(correct.mean())}


def pick_best(table: dict[str, dict[str, Any]], singles: bool) -> tuple[str, str] | None:
    """(row, "kB") with the lowest mean test error at the largest budget that the single networks
    (``singles``) or the ensembles reach in the compare's table; None when there is none."""
    cells = [(row, b, c) for row, per in table.items() for b, c in per.items()
             if (row in SINGLE_ROWS) == singles and (singles or int(c.get("members", 1)) > 1)]
    if not cells:
        return None
    top = max(int(b[:-1]) for _, b, _ in cells)
    at_top = [(c["error"], i, row, b) for i, (row, b, c) in enumerate(cells) if int(b[:-1]) == top]
    _, _, row, b = min(at_top)
    return row, b


# ------------------------------------------------------------------------------------ the analysis
def analyse(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    import torch

    from subspaces.data import build_datasets, make_loader
    from subspaces.ensembles import evaluate
    from subspaces.io import load_model
    from subspaces.metrics import ClassificationMetrics

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    common.check_runtime_args(args)
    timer = common.Timer()
    cmp = open_compare(args.compare_dir, args.seed)
    png, js = common.output_paths(args.output or cmp.root / "ensembles.png")
    device = common.device_of(args)
    seed_dir = cmp.root / f"seed{args.seed}"
    proto = cmp.protocol

    # the compare's data: its subsets (seeded with the protocol's seed), BatchNorm batches and batch size
    first = load_model(seed_dir / "ind0" / "model.safetensors")
    spec = getattr(first, "spec", {})
    own_eval = proto.get("eval_subset")
    eval_subset = own_eval if args.eval_subset is None else (args.eval_subset or None)
    dataset = proto.get("dataset") or spec.get("dataset") or "fashion-mnist"
    data = build_datasets(dataset, root=args.data_dir or proto.get("data_dir"), img_size=spec.get("img_size"),
                          in_chans=spec.get("in_chans"), train_subset=proto.get("train_subset"), eval_subset=eval_subset,
                          holdout=int(proto.get("holdout") or 0), model=first,
                          seed=int(proto["data_seed"] if proto.get("data_seed") is not None else proto["seed"]))
    del first
    batch = args.batch_size or int(cmp.config.get("eval_batch_size") or 500)
    eval_loader = Tracked(make_loader(data.eval, batch, shuffle=False, num_workers=args.workers))
    bn_loader = make_loader(data.bn, int(proto.get("batch_size") or 64), shuffle=False, num_workers=args.workers)
    bn_batches = int(proto.get("bn_batches") or 10)
    C = data.num_classes
    passes = plan_passes(cmp, seed_dir, bn_loader, bn_batches, device)
    common.console.print(f"{cmp.root}: replicate {args.seed} (seed {cmp.seeds[args.seed] if args.seed < len(cmp.seeds) else '?'}), "
                         f"{len(data.eval)} test images, {sum(len(p.members) for p in passes)} networks in {len(passes)} passes")

    by_size: dict[str, Any] = {}
    probs: dict[tuple[str, str], Any] = {}
    alone: dict[tuple[str, str], dict[str, float]] = {}
    with common.progress_bar() as bar:
        for ps in passes:
            eval_loader.bar, eval_loader.task = bar, bar.add_task(f"{ps.name} ({len(ps.members)} networks)", total=len(eval_loader))
            ens = _recording_ensemble(ps.members, ps.subsets)
            res = evaluate(ens, eval_loader, num_classes=C, device=device, per_member=True)
            for key, chunks in ens.records.items():
                probs[key] = torch.cat(chunks)
            if ps.alone is not None:   # the mean of the members' own metrics
                alone[ps.alone] = {m: statistics.fmean(float(r[m]) for r in res["members"]) for m in METRICS}
            if ps.curve:
                curve = res["by_size"][:ps.curve]
                by_size[ps.name] = {"family": ps.family, "members": ps.curve, "budget_sizes": ps.marks,
                                    **{m: [c[m] for c in curve] for m in METRICS},
                                    "error": [100 * (1 - c["acc"]) for c in curve]}
            del ens
    labels = torch.cat(eval_loader.labels)

    sizes = {key: len(idx) for ps in passes for key, idx in ps.subsets.items()}
    points: dict[str, dict[str, Any]] = {}
    for (row, b), p in probs.items():
        metric = ClassificationMetrics(C, n_bins=N_BINS)
        metric.update(p, labels)
        m = metric.compute()
        points.setdefault(row, {})[b] = {**m, "error": 100 * (1 - m["acc"]), "members": sizes[(row, b)]}
    for (row, b), m in alone.items():
        points.setdefault(row, {})[b] = {**m, "error": 100 * (1 - m["acc"]), "members": 1}
    check = compare_check(cmp.rows, points, by_size, same_data=(eval_subset == own_eval))

    reliab: dict[str, Any] = {}
    for kind, singles in (("single", True), ("ensemble", False)):
        best = pick_best(cmp.table, singles)
        if best is None:
            continue
        row, b = best
        key = ("Ind", "1B") if row == "Single network" else (row, b)   # the compare's row is the Ind networks' mean: draw ind0
        if key not in probs:
            continue
        rel = reliability(probs[key], labels)
        cell = cmp.table[row][b]
        label = f"{row} {b}" + (" (ind0)" if row == "Single network" else "")
        reliab[kind] = {"row": row, "budget": b, "label": label, "members": points[key[0]][key[1]]["members"],
                        "selected_by": f"lowest mean test error at {b} over {cmp.replicates} replicate(s) of the compare: "
                                       f"{cell['error']:.2f} %",
                        "error": points[key[0]][key[1]]["error"], "nll": points[key[0]][key[1]]["nll"],
                        "ece_metrics": points[key[0]][key[1]]["ece"], **rel}

    budget = {row: {b: {k: c[k] for k in ("error", "error_std", "nll", "nll_std", "ece", "ece_std", "members", "cost", "n") if k in c}
                    for b, c in per.items()} for row, per in cmp.table.items()}
    seconds = timer()
    data_out = {"compare_dir": str(cmp.root), "title": cmp.title, "replicate": args.seed,
                "seed": cmp.seeds[args.seed] if args.seed < len(cmp.seeds) else None, "budgets": cmp.budgets,
                "eval_count": int(labels.numel()), "eval_subset": eval_subset, "compare_eval_subset": own_eval,
                "bn_batches": bn_batches, "by_size": by_size, "points": points, "check": check,
                "budget": budget, "budget_source": cmp.table_source, "replicates": cmp.replicates,
                "reliability": reliab, "seconds": seconds, "settings": common.settings(args, argv)}
    fig = plot(data_out)
    common.save(fig, data_out, png, js)
    print_summary(data_out)
    return data_out


def compare_check(rows: dict[str, Any], points: dict[str, Any], by_size: dict[str, Any], same_data: bool) -> dict[str, Any]:
    """The largest difference max |m_here - m_compare| over the metrics (acc, NLL, Brier, ECE) of
    every recomputed cell of replicate R and the compare's own ``evaluation.json``: the cells of
    ``points`` (the "Single network" one the mean of the Ind networks' own metrics, as the
    compare's) and the budget prefixes of the Ind / SSE / FGE / ESPRO size curves (the same
    networks on the same data should agree to float precision)."""
    if not same_data:
        return {"compared": 0, "note": "--eval-subset differs from the compare's: not comparable"}
    diffs = []
    for row, per in points.items():
        for b, m in per.items():
            theirs = rows.get(row, {}).get(b)
            if theirs:
                diffs.append(max(abs(m[k] - theirs[k]) for k in METRICS))
    for name, curve in by_size.items():   # the prefix of the size curve at a budget is that budget's ensemble
        for b, n in curve["budget_sizes"].items():
            theirs = rows.get(name, {}).get(b) if name in BUDGET_CURVES else None
            if theirs:
                diffs.append(max(abs(curve[k][n - 1] - theirs[k]) for k in METRICS))
    return {"compared": len(diffs), "max_abs_diff": max(diffs) if diffs else None}


# ------------------------------------------------------------------------------------ the figure
def _style(row: str) -> dict[str, Any]:
    fam = next((f for f in FAMILIES if row.startswith(f)), "Single")
    marker = "*" if fam == "SWA" else "o"
    if "midpoint" in row or "centre" in row:
        marker = "D"
    elif "endpoints" in row or "vertices" in row:
        marker = "s"
    elif "points" in row or "samples" in row:
        marker = "^"
    return {"color": COLORS[fam], "marker": marker}


def row_rank(row: str) -> tuple[int, str]:
    """The compare's table order (baselines, snapshot methods, subspaces), whatever order a JSON file kept."""
    from subspaces.compare import row_rank as rank

    return rank(row)


def plot(data: dict):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(3, 2, figsize=(14.5, 14.5))
    # (1) size curves
    sizes: set[int] = set()
    for name, c in sorted(data["by_size"].items(), key=lambda kv: row_rank(kv[0])):
        x = list(range(1, c["members"] + 1))
        sizes.update(x)
        st = _style(name)
        for ax, key in ((axes[0, 0], "error"), (axes[0, 1], "nll")):
            ax.plot(x, c[key], color=st["color"], marker=".", ms=4, lw=1.6, label=f"{name} ({c['members']})")
            if name in BUDGET_CURVES:
                for b, n in c["budget_sizes"].items():
                    ax.plot([n], [c[key][n - 1]], ls="none", marker="o", ms=8, mfc="none", mec=st["color"], mew=1.3)
                    ax.annotate(b, (n, c[key][n - 1]), textcoords="offset points", xytext=(4, 4), fontsize=7, color=st["color"])
    for row, per in sorted(data["points"].items(), key=lambda kv: row_rank(kv[0])):
        if row in (*BUDGET_CURVES, "Single network") or "points" in row or "samples" in row:
            continue   # on the curves already
        st = _style(row)
        for i, (b, m) in enumerate(sorted(per.items(), key=lambda kv: int(kv[0][:-1]))):
            x = m["members"] if row != "SWA" else data["by_size"].get("FGE", {}).get("budget_sizes", {}).get(b, m["members"])
            sizes.add(x)
            for ax, key in ((axes[0, 0], "error"), (axes[0, 1], "nll")):
                ax.plot([x], [m[key]], ls="none", marker=st["marker"], ms=11 if st["marker"] == "*" else 7, color=st["color"],
                        mec="k", mew=0.5, label=(f"{row}" + (" (avg of the FGE snapshots)" if row == "SWA" else "")) if i == 0 else None)
    ticks = sorted(t for t in {1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100, 200} | {max(sizes, default=1)} if t <= max(sizes, default=1))
    for ax, what in ((axes[0, 0], "test error (%)"), (axes[0, 1], "test NLL")):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ensemble size (first k members, compare order)")
        ax.set_ylabel(what)
        ax.set_title(f"{what} vs ensemble size, replicate {data['replicate']} ({data['eval_count']} test images)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0, 1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    # (2) budgets
    budgets = data["budgets"]
    rows = sorted(data["budget"], key=row_rank)
    at: set[float] = set(budgets)   # x ticks: the budgets and every cell's cost
    for j, row in enumerate(rows):
        per = data["budget"][row]
        bs = [b for b in budgets if f"{b}B" in per]
        st = _style(row)
        shift = (j - (len(rows) - 1) / 2) * 0.03
        costs = [float(per[f"{b}B"].get("cost", b)) for b in bs]   # k, and k (1 + SPRO epochs / B) for ESPRO
        label = row + (" (at its cost)" if any(abs(c - b) > 1e-9 for c, b in zip(costs, bs)) else "")
        at.update(costs)
        for ax, key in ((axes[1, 0], "error"), (axes[1, 1], "nll")):
            ax.errorbar([c + shift for c in costs], [per[f"{b}B"][key] for b in bs], yerr=[per[f"{b}B"].get(f"{key}_std", 0) for b in bs],
                        color=st["color"], marker=st["marker"], ms=8 if st["marker"] == "*" else 5, capsize=3, lw=1.2,
                        ls="-" if len(bs) > 1 else "none", label=label)
    n = data["replicates"]
    for ax, what in ((axes[1, 0], "test error (%)"), (axes[1, 1], "test NLL")):
        ticks = sorted(at)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.3g}B" for t in ticks])
        ax.set_xlabel("training budget / cost (B = epochs of one network)")
        ax.set_ylabel(what)
        ax.set_title(f"{what} vs budget: mean ± std over {n} replicate{'s' if n != 1 else ''} (the compare's results)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[1, 1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    # (3) reliability
    for ax, kind in ((axes[2, 0], "single"), (axes[2, 1], "ensemble")):
        rel = data["reliability"].get(kind)
        if rel is None:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"no {kind} model in this compare", ha="center", va="center")
            continue
        edges = rel["edges"]
        width = edges[1] - edges[0]
        lefts = edges[:-1]
        acc = [a if a is not None else 0.0 for a in rel["accuracy"]]
        conf = [c if c is not None else 0.0 for c in rel["confidence"]]
        occupied = [c > 0 for c in rel["count"]]
        ax.bar(lefts, acc, width=width, align="edge", color="C0", edgecolor="k", lw=0.6, label="accuracy")
        gap_bottom = [min(a, c) for a, c in zip(acc, conf)]
        gap_height = [abs(c - a) if o else 0.0 for a, c, o in zip(acc, conf, occupied)]
        ax.bar(lefts, gap_height, bottom=gap_bottom, width=width, align="edge", facecolor="none", edgecolor="C3",
               hatch="///", lw=0.8, label="gap: |confidence - accuracy|")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for left, c, a, f, o in zip(lefts, rel["count"], acc, conf, occupied):
            if o:
                ax.text(left + width / 2, 0.015, str(c), ha="center", va="bottom", fontsize=6, rotation=90,
                        color="white" if a >= 0.15 else "0.2")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence (top-label probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"best {kind}: {rel['label']} ({rel['members']} network{'s' if rel['members'] != 1 else ''})\n"
                     f"error {rel['error']:.2f} %, ECE {rel['ece']:.4f} ({N_BINS} bins), replicate {data['replicate']}", fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, title="numbers in the bars: examples per bin",
                  title_fontsize=7)
    fig.suptitle(f"{data['title']}\n{data['compare_dir']}; numbers in the JSON beside this PNG", fontsize=11)
    fig.tight_layout()
    return fig


def print_summary(data: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{data['compare_dir']}: replicate {data['replicate']}, {data['eval_count']} test images")
    for col in ("method", "members", "error % (1 member)", "error % (all)", "NLL (1 member)", "NLL (all)"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for name, c in data["by_size"].items():
        t.add_row(name, str(c["members"]), f"{c['error'][0]:.2f}", f"{c['error'][-1]:.2f}", f"{c['nll'][0]:.4f}", f"{c['nll'][-1]:.4f}")
    common.console.print(t)
    for kind, rel in data["reliability"].items():
        common.console.print(f"best {kind}: {rel['label']}, error {rel['error']:.2f} %, ECE {rel['ece']:.4f}")
    chk = data["check"]
    if chk.get("max_abs_diff") is not None:
        common.console.print(f"{chk['compared']} cells (acc, NLL, ECE, Brier) agree with the compare's evaluation.json to {chk['max_abs_diff']:.1e}")
    common.console.print(f"{data['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = common.parse(p, argv)
    return common.run(lambda: analyse(args, argv))


if __name__ == "__main__":
    sys.exit(main())
