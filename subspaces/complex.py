"""Mode-connecting simplicial complexes [B] (docs/complex.md): k trained modes joined by m shared vertices.

Anchors 0..k-1 are the modes (trained networks, frozen) and anchors k..k+m-1 the shared vertices.
The complex is the union of the k simplices

    S_i = conv(mode_i, shared_0, ..., shared_{m-1}),        i = 0..k-1,

each with d = m + 1 vertices; any two of them meet in the face spanned by the shared vertices.
A point is a coefficient vector c in R^K (K = k + m), c >= 0, sum c = 1, supported on the
vertices of one simplex: w(c) = sum_j c_j W_j. Training minimises

    E_i E_{p ~ Dirichlet(1_d)} L(w(p on S_i))  -  lambda / sum_i log(Vol0_i^2 + eps) * sum_i log(Vol_i^2 + eps)

over the shared vertices only (the modes stay bit-identical): a shared vertex belongs to every
simplex, so its gradient collects the terms of all of them. The simplex i is drawn uniformly,
as [B]'s training code does (``SimplexNet.vertex_weights``: ``np.random.randint(n_simplex)``;
their volume-weighted ``SimplicialComplex`` module is not used to train): every simplex has the
same dimension, and a uniform draw gives every mode's simplex the same share of the steps
whatever their current volumes.

[B]'s code regularises ``total_volume()`` = the volume of simplex 0 only (its sum over simplices
is commented out); here the volume term is summed over every simplex
(:func:`subspaces.regularizers.volume_penalty` reads ``simplices``), so that no mode's simplex is
favoured. :func:`run_complex` trains the shared vertices one at a time as [B]'s
``complex_iterative.py`` does: each new one starts at the centroid of all current vertices,
joins every simplex, and the earlier ones are frozen; the first is trained without the volume
term (its simplices are edges mode_i - shared_0, whose length the term would only push apart).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from accelerate.logging import get_logger

from .data import make_loader
from .errors import CheckpointError, ConfigError
from .io import create_model, load_model, load_weights_into, write_json, write_weights
from .pointwise import evaluate_points
from .shapes import check_same_architecture
from .subspace import Point, Subspace, layout_for
from .checkpoint import has_checkpoint
from .compare_progress import StageProgress
from .run_folder import make_accelerator, prepare_run, read_config, save_config
from .settings import POINT_SEED_STRIDE, ComplexConfig
from .training import Trainer, bn_loader, build_data_for_spec

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)

#: coordinates below this count as zero when deciding which simplex holds a point
SUPPORT_TOL = 1e-6


def _count(name: str, value: Any, minimum: int, hint: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid: it must be an int >= {minimum} ({hint})")
    return value


class SimplicialComplex(Subspace):
    """k modes and m shared vertices; k simplices (mode_i, shared_0, .., shared_{m-1}).

    Args:
        model: the network (its class and parameter layout; anchors come from ``connect``).
        modes: k >= 2, the anchors 0..k-1.
        shared: m >= 1, the anchors k..k+m-1, in every simplex.
        **kwargs: as :class:`~subspaces.subspace.Subspace` (``include``, ``exclude``, ``seed``,
            ``init``); only ``sampling="global"`` (one point of the complex per forward).

    Points: Tensor[K] coefficient vectors (K = k + m), >= 0, summing to 1, nonzero only on the
    vertices of one simplex. Sampling: simplex i ~ U{0..k-1}, then Dirichlet(1) barycentric
    coordinates over its d = m + 1 vertices. Centre: the centroid of the shared vertices, the
    face every simplex contains.
    """

    def __init__(self, model: nn.Module, modes: int = 2, shared: int = 1, **kwargs: Any) -> None:
        self.modes = _count("modes", modes, 2, "a complex joins at least 2 modes; one mode with shared vertices is a Simplex")
        self.shared = _count("shared", shared, 1, "at least 1 shared vertex joins the modes")
        if kwargs.get("sampling", "global") != "global":
            raise ConfigError(f"sampling={kwargs['sampling']!r}: a SimplicialComplex draws one point per forward; use sampling='global'")
        super().__init__(model, self.modes + self.shared, **kwargs)

    # ------------------------------------------------------------------ structure
    @property
    def simplices(self) -> tuple[tuple[int, ...], ...]:
        """Vertex indices of each simplex: ((0, k, .., k+m-1), (1, k, ..), .., (k-1, k, ..))."""
        face = tuple(range(self.modes, self.num_anchors))
        return tuple((i, *face) for i in range(self.modes))

    def shared_indices(self) -> list[int]:
        """Anchor indices of the shared vertices: [k, .., k+m-1]."""
        return list(range(self.modes, self.num_anchors))

    def simplex_of(self, point: Point) -> int:
        """Index i of the simplex holding ``point`` (Tensor[K]); the lowest one for a point of the shared face."""
        p = self.validate_point(point)
        return self._holder(p)

    def _holder(self, p: Tensor) -> int:
        support = {int(j) for j in torch.nonzero(p.abs() > SUPPORT_TOL).flatten()}
        for i, simplex in enumerate(self.simplices):
            if support <= set(simplex):
                return i
        on_modes = sorted(j for j in support if j < self.modes)
        raise ValueError(
            f"point has weight on modes {on_modes}: a point of the complex lies in one simplex "
            f"(one mode plus the shared vertices {self.shared_indices()}), so at most one mode coordinate is nonzero"
        )

    # ------------------------------------------------------------------ shape interface
    def coefficients(self, point: Point) -> Tensor:
        """The coefficient vector is the point: Tensor[..., K] -> Tensor[..., K]."""
        p = torch.as_tensor(point)
        return p if p.is_floating_point() else p.float()

    def centre(self) -> Tensor:
        """Centroid of the shared vertices: Tensor[K], 1/m on each shared vertex."""
        c = torch.zeros(self.num_anchors)
        c[self.modes:] = 1.0 / self.shared
        return c

    def sample_simplex(self, index: int, generator: torch.Generator | None = None, n: int | None = None) -> Tensor:
        """Uniform points of simplex ``index``: Dirichlet(1) over its d vertices, zero elsewhere.

        Returns Tensor[K] (or Tensor[n, K]).
        """
        if not isinstance(index, int) or not 0 <= index < self.modes:
            raise ConfigError(f"simplex index {index!r} is out of range: this complex has simplices 0..{self.modes - 1}")
        idx = torch.full((1 if n is None else n,), index, dtype=torch.long)
        out = self._draw(idx, generator)
        return out[0] if n is None else out

    def sample(self, generator: torch.Generator | None = None, n: int | None = None) -> Tensor:
        """A simplex i ~ U{0..k-1}, then Dirichlet(1) over its vertices: Tensor[K] (or Tensor[n, K])."""
        idx = torch.randint(self.modes, (1 if n is None else n,), generator=generator)
        out = self._draw(idx, generator)
        return out[0] if n is None else out

    def _draw(self, simplex_index: Tensor, generator: torch.Generator | None) -> Tensor:
        """Dirichlet(1) coordinates as normalised Exp(1) draws, scattered onto each row's simplex: Tensor[n, K]."""
        vertices = torch.tensor(self.simplices, dtype=torch.long)[simplex_index]   # [n, d]
        e = torch.empty(vertices.shape).exponential_(generator=generator)
        return torch.zeros(vertices.shape[0], self.num_anchors).scatter_(1, vertices, e / e.sum(-1, keepdim=True))

    def validate_point(self, point: Point) -> Tensor:
        p = point.detach().float() if isinstance(point, Tensor) else torch.as_tensor(point, dtype=torch.float32)
        K = self.num_anchors
        if p.ndim != 1 or p.shape[0] != K:
            raise ValueError(f"a point of this complex has {K} coordinates (one per vertex: {self.modes} modes, "
                             f"{self.shared} shared), got shape {tuple(p.shape)}")
        if not torch.compiler.is_compiling():
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"point {p.tolist()} is not finite: coordinates are numbers >= 0 summing to 1")
            if bool((p < -SUPPORT_TOL).any()):
                raise ValueError(f"point {p.tolist()} has a negative coordinate: barycentric coordinates are >= 0")
            if abs(float(p.sum()) - 1) > 1e-4:
                raise ValueError(f"point {p.tolist()} sums to {float(p.sum()):g}, not 1: barycentric coordinates sum to 1")
            self._holder(p)
        return p

    # ------------------------------------------------------------------ construction
    def _connect_sources(self, ends: list[list[Tensor]]) -> list[list[Tensor]]:
        centroid = [sum(ts[1:], ts[0].clone()) / len(ts) for ts in zip(*ends)]
        return [list(e) for e in ends] + [[c.clone() for c in centroid] for _ in range(self.shared)]

    @classmethod
    def connect(cls, models: Sequence[nn.Module], shared: int = 1, **kwargs: Any) -> SimplicialComplex:
        """A complex whose modes are copies of ``models`` (frozen) and whose ``shared`` vertices
        start at the modes' centroid, all trainable (train them jointly, or use
        :meth:`add_shared_vertex` to grow them one at a time as [B]).
        BatchNorm buffers and parameters outside the subspace start from ``models[0]``."""
        models = list(models)
        if len(models) < 2:
            raise ConfigError(f"SimplicialComplex.connect got {len(models)} model(s): pass at least 2 trained networks (the modes)")
        check_same_architecture(models)
        sub = cls(models[0], modes=len(models), shared=shared, _endpoints=models, **kwargs)
        for k in range(sub.modes):
            sub.freeze_anchor(k)
        return sub

    @torch.no_grad()
    def add_shared_vertex(self) -> int:
        """[B]'s next connector: freeze every vertex, add a shared vertex at the centroid of all of
        them (modes and shared), in every simplex; returns its anchor index (K - 1 afterwards).

        Rebuild the optimiser afterwards: the new vertex's Parameters are new tensors.
        """
        self.shared += 1
        return self.append_centroid_anchor()

    def extra_repr(self) -> str:
        return f"modes={self.modes}, shared={self.shared}, " + super().extra_repr()


# ---------------------------------------------------------------------------------------- files
def save_complex(sub: SimplicialComplex, path: str | Path, spec: dict[str, Any]) -> Path:
    """Write ``path``.safetensors (the state_dict) and ``path``.json (model spec, modes, shared, frozen)."""
    info = {"modes": sub.modes, "shared": sub.shared, "frozen": [k for k in range(sub.num_anchors) if not sub.anchor_trainable(k)],
            "include": sub.include, "exclude": sub.exclude}
    return write_weights(sub, path, {**spec, "kind": "complex", "complex": info})


def load_complex(path: str | Path) -> SimplicialComplex:
    """Recreate a complex written by :func:`save_complex` (``path``: the .safetensors or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "complex.safetensors"
    spec_path = path.with_suffix(".json")
    try:
        spec = json.loads(spec_path.read_text())
        info = spec["complex"]
        modes, shared = int(info["modes"]), int(info["shared"])
    except FileNotFoundError:
        raise CheckpointError(f"{spec_path} does not exist: pass a stage folder of recipes/complex.py or its complex.safetensors") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{spec_path} is not a complex's spec ({type(err).__name__}: {err}): truncated or of another kind?") from None
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: the stage was not finished; run it again with --resume")
    sub = SimplicialComplex(create_model(spec), modes=modes, shared=shared, include=info.get("include"),
                            exclude=info.get("exclude"), init=lambda m: None)
    load_weights_into(sub, path, spec, spec_path, f"a complex of {spec['model']}")
    for k in info.get("frozen", []):
        sub.freeze_anchor(k)
    sub.spec = spec  # type: ignore[assignment]
    return sub


# ---------------------------------------------------------------------------------------- the recipe
def mode_epochs(paths: Sequence[str], override: float | None) -> float | None:
    """B, the epochs of one mode: ``override``, else the ``epochs`` of the first mode's run folder
    config.yaml (None when the modes are bare .safetensors files without one)."""
    if override is not None:
        return float(override)
    for path in paths:
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        for cfg in (folder / "config.yaml", folder.parent / "config.yaml"):
            if cfg.exists():
                epochs = read_config(str(cfg)).get("epochs")
                if isinstance(epochs, (int, float)) and epochs > 0:
                    return float(epochs)
    return None


def complex_cost(modes: int, shared: int, epochs: int, samples_per_step: int, base_epochs: float | None) -> dict[str, Any]:
    """Training cost of the shared vertices, counted as the compare protocol counts ESPRO:
    m E s epochs of one network's forward/backward passes (m shared vertices, E epochs each, s
    points per batch); in B (one mode's epochs) that is m E s / B, and k + m E s / B with the modes."""
    passes = shared * epochs * samples_per_step
    out: dict[str, Any] = {"shared_vertex_epochs": shared * epochs, "points_per_batch": samples_per_step,
                           "gradient_epochs": passes, "mode_epochs_B": base_epochs}
    if base_epochs:
        out.update({"complex_cost_B": passes / base_epochs, "total_cost_B": modes + passes / base_epochs, "ind_cost_B": float(modes)})
    return out


def _summary(errors: Tensor, nll: Tensor) -> dict[str, float]:
    """Mean / std / min / max of per-point errors and the mean NLL of N points: Tensor[N] each."""
    e = errors.double()
    return {"points": int(e.numel()), "error_mean": float(e.mean()), "error_std": float(e.std()) if e.numel() > 1 else 0.0,
            "error_min": float(e.min()), "error_max": float(e.max()), "nll_mean": float(nll.double().mean()),
            "nll_max": float(nll.double().max())}


def evaluate_complex(sub: SimplicialComplex, eval_loader: Any, bn: Any, *, samples: int, members: int, seed: int,
                     bn_batches: int | None) -> dict[str, Any]:
    """Test error and NLL of the vertices, of ``samples`` uniform points of each simplex, of all of
    them together, and of ensembles: the first n of ``members`` points drawn across the complex
    (simplex ~ U, Dirichlet(1) in it) against Ind(n), the first n modes, for n = 1..k, and the
    ``members``-point complex ensemble. BatchNorm is recomputed at every point (one pass each over
    ``bn`` and ``eval_loader`` for all points); draws come from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    k, K = sub.modes, sub.num_anchors
    per = [sub.sample_simplex(i, gen, n=samples) for i in range(k)]    # k x [S, K]
    across = sub.sample(gen, n=members)                                  # [M, K]
    coeffs = torch.cat([torch.eye(K), *per, across])
    first_across = K + k * samples
    sizes = sorted({*range(1, k + 1), members})
    groups = [list(range(n)) for n in range(1, k + 1)] + [list(range(first_across, first_across + n)) for n in sizes]
    res = evaluate_points(sub, coefficients=coeffs, loaders=eval_loader, bn_loader=bn, bn_batches=bn_batches, ensembles=groups)
    err, nll = res.error, res.loss
    vertices = {f"mode{i}": {"error": float(err[i]), "nll": float(nll[i])} for i in range(k)}
    vertices.update({f"shared{j - k}": {"error": float(err[j]), "nll": float(nll[j])} for j in range(k, K)})
    simplices = {}
    for i in range(k):
        rows = slice(K + i * samples, K + (i + 1) * samples)
        s = _summary(err[rows], nll[rows])
        s.update({"vertices": list(sub.simplices[i]), "mode_error": float(err[i]), "mode_nll": float(nll[i]),
                  "gap_mean": s["error_mean"] - float(err[i]), "gap_max": s["error_max"] - float(err[i])})
        simplices[f"simplex{i}"] = s
    all_rows = slice(K, first_across)
    whole = _summary(err[all_rows], nll[all_rows])
    whole["modes_error_mean"] = float(err[:k].double().mean())
    whole["gap_mean"] = whole["error_mean"] - whole["modes_error_mean"]
    whole["gap_max_per_simplex"] = max(simplices[f"simplex{i}"]["gap_max"] for i in range(k))
    ensembles = {}
    for n in range(1, k + 1):
        ensembles[f"Ind ({n} modes)"] = {"members": n, "error": 1 - float(res.ensemble_acc[n - 1]), "nll": float(res.ensemble_loss[n - 1])}
    for j, n in enumerate(sizes):
        ensembles[f"complex ({n} points)"] = {"members": n, "error": 1 - float(res.ensemble_acc[k + j]), "nll": float(res.ensemble_loss[k + j])}
    return {"vertices": vertices, "simplices": simplices, "complex": whole, "ensembles": ensembles, "test_examples": res.count,
            "claim_within_1_point": bool(whole["gap_max_per_simplex"] <= 0.01), "claim_mean_within_1_point": bool(whole["gap_mean"] <= 0.01)}


def _train_seconds(stage: Path) -> float:
    """Seconds of training in a stage folder, from its metrics.jsonl (summed over epochs, resumes included)."""
    path = stage / "metrics.jsonl"
    if not path.exists():
        return 0.0
    total = 0.0
    for line in path.read_text().splitlines():
        try:
            total += float(json.loads(line).get("seconds", 0.0))
        except (ValueError, AttributeError):
            continue
    return total


def train_shared_vertices(args: ComplexConfig, modes: Sequence[nn.Module], data: Any, spec: dict[str, Any],
                          accelerator: Any, out: Path) -> SimplicialComplex:
    """Grow the complex one shared vertex at a time; stage ``out/shared{v}`` is resumable and,
    once finished (``complex.safetensors`` written), reused as it is."""
    sub: SimplicialComplex | None = None
    stages = StageProgress("complex", args.shared, enabled=accelerator.is_main_process)
    for v in range(args.shared):
        stage = out / f"shared{v}"
        if (stage / "complex.safetensors").exists():
            sub = load_complex(stage)
            logger.info(f"shared vertex {v} already trained, reused from {stage}")
            stages.end(stage.name, reused=True)
            continue
        if sub is None:
            sub = SimplicialComplex.connect(modes, shared=1, seed=args.seed + POINT_SEED_STRIDE * accelerator.process_index,
                                            layout=layout_for(args.opt, args.layer_decay))
        else:
            sub.add_shared_vertex()
        stage.mkdir(parents=True, exist_ok=True)
        # [B]: the first connector's simplices are edges; the volume term starts with the second
        stage_args = dataclasses.replace(args, output=str(stage), volume_lambda=0.0 if v == 0 else args.volume_lambda)
        if accelerator.is_main_process:
            save_config(stage_args, str(stage / "config.yaml"))
        # a Trainer per stage, each with an accelerator of its own: accelerate names the checkpoints
        # under its project folder and keeps the objects registered for checkpointing
        trainer = Trainer(stage_args, sub, data, spec, make_accelerator(stage_args, project_dir=stage), stage)
        stages.begin(stage.name)
        trainer.fit(resume=has_checkpoint(stage))
        sub = trainer.unwrapped  # type: ignore[assignment]
        if accelerator.is_main_process:
            save_complex(sub, stage / "complex", spec)
        accelerator.wait_for_everyone()
        stages.end(stage.name)
    assert sub is not None
    return sub


def run_complex(args: ComplexConfig) -> dict[str, Any]:
    """The whole of recipes/complex.py: train the shared vertices (resumable per vertex), then
    evaluate the complex and write ``results.json`` (and ``complex.safetensors``) to ``--output``."""
    started = time.perf_counter()
    modes = [load_model(p) for p in args.checkpoints]
    check_same_architecture(modes)
    with prepare_run(args) as run:
        out, accelerator = run.out, run.accelerator
        spec = dict(modes[0].spec)
        run.record(spec)
        data = build_data_for_spec(args, spec, modes[0])
        sub = train_shared_vertices(args, modes, data, spec, accelerator, out)
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return {"finished": True}
        trained = time.perf_counter()
        eval_loader = make_loader(data.eval, args.batch_size, shuffle=False)
        results = evaluate_complex(sub, eval_loader, bn_loader(data, args.batch_size), samples=args.samples,
                                   members=args.ensemble_members, seed=args.seed, bn_batches=args.bn_batches)
        evaluated = time.perf_counter()
        save_complex(sub, out / "complex", spec)
        base = mode_epochs(args.checkpoints, args.mode_epochs)
        stage_seconds = {f"shared{v}": round(_train_seconds(out / f"shared{v}"), 1) for v in range(args.shared)}
        report = {
            "title": "simplicial complex [B]", "modes": list(args.checkpoints), "simplex_vertices": [list(s) for s in sub.simplices],
            "shared": args.shared, "epochs_per_shared_vertex": args.epochs, "samples_per_step": args.samples_per_step,
            "volume_lambda": args.volume_lambda, "volume_form": args.volume_form, "samples_per_simplex": args.samples,
            "ensemble_members": args.ensemble_members, "bn_batches": args.bn_batches,
            "cost": complex_cost(sub.modes, args.shared, args.epochs, args.samples_per_step, base),
            "seconds": {"train_per_shared_vertex": stage_seconds, "train": round(sum(stage_seconds.values()), 1),
                        "evaluate": round(evaluated - trained, 1), "this_process": round(time.perf_counter() - started, 1)},
            **results,
        }
        write_json(report, out / "results.json")
        print_report(report)
        accelerator.wait_for_everyone()
        return {"finished": True, "results": report}


def print_report(report: dict[str, Any]) -> None:
    """Two rich tables: per-simplex sampled points against their mode, and ensembles at equal members."""
    console = Console(width=max(Console().width, 110))   # the tables stay readable in a log file
    table = Table(title="simplicial complex: test error (%) of points sampled uniformly in each simplex, BN recomputed at each")
    for col in ("simplex", "points", "mode error", "mean error", "min", "max", "mean - mode", "mean NLL", "mode NLL"):
        table.add_column(col, justify="left" if col == "simplex" else "right")
    for name, s in report["simplices"].items():
        table.add_row(name, str(s["points"]), f"{100 * s['mode_error']:.2f}", f"{100 * s['error_mean']:.2f}", f"{100 * s['error_min']:.2f}",
                      f"{100 * s['error_max']:.2f}", f"{100 * s['gap_mean']:+.2f}", f"{s['nll_mean']:.4f}", f"{s['mode_nll']:.4f}")
    c = report["complex"]
    table.add_row("whole complex", str(c["points"]), f"{100 * c['modes_error_mean']:.2f}", f"{100 * c['error_mean']:.2f}",
                  f"{100 * c['error_min']:.2f}", f"{100 * c['error_max']:.2f}", f"{100 * c['gap_mean']:+.2f}", f"{c['nll_mean']:.4f}", "")
    console.print(table)
    ens = Table(title="ensembles: points across the complex against the modes alone (Ind)")
    for col in ("ensemble", "members", "error %", "NLL"):
        ens.add_column(col, justify="left" if col == "ensemble" else "right")
    for name, e in report["ensembles"].items():
        ens.add_row(name, str(e["members"]), f"{100 * e['error']:.2f}", f"{e['nll']:.4f}")
    console.print(ens)
    cost = report["cost"]
    if cost.get("complex_cost_B") is not None:
        console.print(f"cost: shared vertices {cost['gradient_epochs']} epochs of passes = {cost['complex_cost_B']:.2f}B; "
                      f"with the modes {cost['total_cost_B']:.2f}B (Ind: {cost['ind_cost_B']:.0f}B)")
