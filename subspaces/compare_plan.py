"""The comparison's plan: every derived number of the protocol, a pure function of its settings.

:func:`make_plan` turns the compare's settings (the flags of ``recipes/compare.py``) and the size
of the training set into a :class:`Plan` (updates per epoch, FGE's start and cycle, SSE's cycle,
ESPRO's simplexes) and :func:`accounting` into the budget accounting printed with the results;
nothing here trains or reads a file, so a plan is testable without training (docs/science.md §7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .settings import METHODS, CompareConfig
from .snapshots import cycle_iterations, updates_per_epoch, validate_cycle

#: flags that describe the job, not the protocol: a restarted compare may change them
JOB_KEYS = ("seeds", "output", "resume", "stop_after_runs", "log_interval", "workers", "eval_batch_size", "cpu", "config",
            "threads", "jobs")

#: replicate r uses seeds seed + SEED_STRIDE * r; within it each method's members start at OFFSETS[method]
SEED_STRIDE = 1000
OFFSETS = {"ind": 0, "sse": 10, "fge": 20, "line": 30, "simplex": 40, "espro": 50, "layerwise": 60}
#: environment variables of a distributed launch: a member's worker process must not see them,
#: or accelerate would join it to the launcher's process group

@dataclass
class Plan:
    """Every derived number of the protocol, in iterations (optimiser updates) where it matters."""

    B: int                         # epochs of one standard network
    upe: int                       # updates per epoch
    budgets: list[int]             # multiples of B reported (e.g. 1, 2, 3)
    subspace_budgets: list[int]    # budgets at which a line / simplex is trained from scratch
    methods: list[str]
    pretrain_iter: int             # FGE starts from Ind network 0 after this many iterations
    fge_cycle: int
    fge_epochs: int                # epochs of the FGE run (the last may go past the budget; unused)
    sse_cycle: int
    sse_epochs: int
    espro_vertices: int = 0        # vertices of each SPRO simplex, the Ind network included
    spro_epochs: int = 0           # epochs per added vertex
    spro_samples_per_step: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def budget_iters(self) -> int:
        return self.B * self.upe

    def fge_count(self, k: int, snaps: list[int]) -> int:
        return sum(1 for i in snaps if self.pretrain_iter + i <= k * self.budget_iters)

    def sse_count(self, k: int, snaps: list[int]) -> int:
        return sum(1 for i in snaps if i <= k * self.budget_iters)

    @property
    def spro_cost(self) -> float:
        """Cost of one SPRO simplex in B: (vertices - 1) x epochs per vertex x points per batch / B."""
        return (self.espro_vertices - 1) * self.spro_epochs * self.spro_samples_per_step / self.B

    def cost(self, row: str, k: int) -> float:
        """Training cost of a table cell in B: k for every method but ESPRO, which adds its SPRO epochs."""
        return k * (1 + self.spro_cost) if row == "ESPRO" else float(k)


def budget_list(text: str, what: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]: positive whole multiples of B, sorted, each once (ConfigError otherwise)."""
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated whole numbers, e.g. 1,2,3; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--{what} {text!r}: give positive whole multiples of the budget B, e.g. 1,2,3")
    return sorted(set(values))


def make_plan(args: CompareConfig, num_train: int) -> Plan:
    """Validate the protocol's flags and derive its numbers; ConfigError names what is wrong.

    Every member trains in a process of its own, so the updates per epoch are those of one
    process with ``--batch-size`` and ``--grad-accum-steps`` whatever the launcher.
    """
    if args.epochs < 1:
        raise ConfigError(f"--epochs (the budget B of one standard network) must be >= 1, got {args.epochs}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.samples < 2:
        raise ConfigError(f"--samples (points per subspace ensemble) must be >= 2, got {args.samples}")
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {','.join(METHODS)}")
    if "ind" not in methods:
        methods.insert(0, "ind")
    if "swa" in methods and "fge" not in methods:
        raise ConfigError("--methods: swa averages the FGE snapshots; add fge")
    budgets = budget_list(args.budgets, "budgets")
    sub_budgets = budget_list(args.subspace_budgets, "subspace-budgets")
    if not 0 < args.fge_pretrain < 1:
        raise ConfigError(f"--fge-pretrain {args.fge_pretrain}: the fraction of B before FGE starts must be in (0, 1) ([G]: 0.8)")
    B = args.epochs
    upe = updates_per_epoch(num_train, args.batch_size, 1, args.grad_accum_steps)
    Bi = B * upe
    top = max(budgets)
    pre = round(args.fge_pretrain * Bi)
    if pre < 1:
        raise ConfigError(f"--fge-pretrain {args.fge_pretrain} of {Bi} iterations leaves FGE no pre-training")
    notes = []
    fge_cycle, fge_epochs = 0, 0
    if "fge" in methods:
        left = Bi - pre
        if args.fge_cycle is None and args.fge_cycle_iters is None:
            # four cycles in the FGE part of 1B (fewer when they do not fit): on the default compare a
            # cycle of 156 iterations gave FGE(1B) 11.07 % against 11.33 % with 314 (docs/compare.md)
            fge_cycle = max(2, 2 * (left // 8))
        else:
            fge_cycle = cycle_iterations("fge", upe, args.fge_cycle, args.fge_cycle_iters)
        validate_cycle("fge", fge_cycle, top * Bi - pre, budget_iters=left)
        if not args.fge_lr_max > args.fge_lr_min >= 0:
            raise ConfigError(f"FGE needs --fge-lr-max > --fge-lr-min >= 0, got {args.fge_lr_max} and {args.fge_lr_min}")
        fge_epochs = math.ceil((top * Bi - pre) / upe)
        if fge_epochs * upe + pre > top * Bi:
            notes.append(f"the FGE run trains {fge_epochs * upe + pre - top * Bi} iterations past {top}B (whole epochs); snapshots there are not used")
    sse_cycle, sse_epochs = 0, 0
    if "sse" in methods:
        if args.sse_cycle is None and args.sse_cycle_iters is None:
            sse_cycle = max(1, Bi // 2)   # two snapshots per B
        else:
            sse_cycle = cycle_iterations("sse", upe, args.sse_cycle, args.sse_cycle_iters)
        validate_cycle("sse", sse_cycle, top * Bi, budget_iters=Bi)
        sse_epochs = top * B
    espro = {}
    if "espro" in methods:
        if args.espro_vertices < 2:
            raise ConfigError(f"--espro-vertices {args.espro_vertices}: a SPRO simplex needs at least 2 vertices (the Ind network and one more)")
        if args.spro_epochs < 1 or args.spro_samples_per_step < 1:
            raise ConfigError(f"--spro-epochs and --spro-samples-per-step must be >= 1, got {args.spro_epochs} and {args.spro_samples_per_step}")
        if args.spro_lr <= 0 or args.spro_volume_lambda < 0:
            raise ConfigError(f"--spro-lr must be > 0 and --spro-volume-lambda >= 0, got {args.spro_lr} and {args.spro_volume_lambda}")
        espro = {"espro_vertices": args.espro_vertices, "spro_epochs": args.spro_epochs, "spro_samples_per_step": args.spro_samples_per_step}
        per_vertex = args.spro_epochs * args.spro_samples_per_step / B   # in B: one added vertex of one SPRO simplex
        if 1 + (args.espro_vertices - 1) * per_vertex > top:   # ESPRO(1): one Ind network and its simplex
            fit = 1 + int((top - 1) / per_vertex + 1e-9)
            hint = f"use --espro-vertices <= {fit}" if fit >= 2 else "lower --spro-epochs / --spro-samples-per-step"
            raise ConfigError(f"--espro-vertices {args.espro_vertices} x --spro-epochs {args.spro_epochs} x --spro-samples-per-step "
                              f"{args.spro_samples_per_step} cost {1 + (args.espro_vertices - 1) * per_vertex:g}B for one network's simplex, "
                              f"above the largest budget {top}B: {hint}, or raise --budgets")
    return Plan(B=B, upe=upe, budgets=budgets, subspace_budgets=sub_budgets, methods=methods, pretrain_iter=pre,
                fge_cycle=fge_cycle, fge_epochs=fge_epochs, sse_cycle=sse_cycle, sse_epochs=sse_epochs, notes=notes, **espro)


def accounting(plan: Plan, args: CompareConfig) -> list[str]:
    """The budget accounting, one line per method (printed and written to results.md)."""
    Bi, u = plan.budget_iters, plan.upe
    ks = ", ".join(f"{k}B" for k in plan.budgets)
    lines = [f"B = {plan.B} epochs of {args.train_subset or 'all'} training examples = {Bi} iterations "
             f"({u} per epoch, batch {args.batch_size}); budgets {ks}."]
    lines.append("Ind(kB): the first k of independently trained networks (different seeds), each B epochs: cost k x B.")
    if "sse" in plan.methods:
        lines.append(f"SSE(kB): one run from scratch, cosine from lr {args.sse_lr_max or args.lr:g} restarted every {plan.sse_cycle} iterations "
                     f"({plan.sse_cycle / u:.2f} epochs); the snapshots taken by iteration k x {Bi}: cost k x B.")
    if "fge" in plan.methods:
        lines.append(f"FGE(kB): Ind network 0 at iteration {plan.pretrain_iter} ({args.fge_pretrain:g}B, its checkpoint and momentum), then "
                     f"lr {args.fge_lr_max:g} -> {args.fge_lr_min:g} cycles of {plan.fge_cycle} iterations ({plan.fge_cycle / u:.2f} epochs), "
                     f"snapshot at mod(i, {plan.fge_cycle}) = {plan.fge_cycle // 2}; the snapshots taken by iteration k x {Bi} counted from the "
                     f"network's start: cost k x B, the {args.fge_pretrain:g}B pre-training included.")
    if "swa" in plan.methods:
        lines.append("SWA(kB): the FGE(kB) snapshots averaged in weight space, BatchNorm recomputed: cost k x B.")
    sb = ", ".join(f"{k}B" for k in plan.subspace_budgets)
    if "line" in plan.methods:
        lines.append(f"Line(kB): a line from scratch ([W], beta {args.line_beta:g}) trained k x B epochs (one forward/backward per batch): "
                     f"cost k x B; trained at {sb}. Midpoint t=0.5; ends t=0,1; {args.samples} evenly spaced t (ends included).")
    if "layerwise" in plan.methods:
        lines.append(f"Line, layerwise(kB): a line from scratch with an independent point per layer ([W]'s layerwise variant, beta "
                     f"{args.line_beta:g}) trained k x B epochs: cost k x B; trained at {sb}. Midpoint; endpoints.")
    if "simplex" in plan.methods:
        lines.append(f"Simplex(kB): a {args.simplex_vertices}-vertex simplex from scratch (beta {args.simplex_beta:g}) trained k x B epochs: "
                     f"cost k x B; trained at {sb}. Centre; vertices; {args.samples} Dirichlet(1) samples.")
    if "espro" in plan.methods:
        lines.append(f"ESPRO(k) [B]: from each of the first k Ind networks a SPRO simplex of {plan.espro_vertices} vertices, each added vertex "
                     f"trained {plan.spro_epochs} epochs (lr {args.spro_lr:g}, {plan.spro_samples_per_step} point(s) per batch, volume lambda "
                     f"{args.spro_volume_lambda:g} on [B]'s scale); {args.samples} points sampled from each simplex: cost k x (1 + "
                     f"{plan.spro_cost:.3f}) x B.")
    lines.append(f"BatchNorm recomputed at every evaluated network (the Ind networks, snapshots, averages and subspace points) on "
                 f"{args.bn_batches} batches of unaugmented training images, weighted by samples; ensembles average probabilities.")
    return lines + plan.notes


def protocol_of(args: CompareConfig) -> dict[str, Any]:
    """The settings that decide the comparison's results (all but the job's, :data:`JOB_KEYS`)."""
    return {k: v for k, v in sorted(args.to_dict().items()) if k not in JOB_KEYS}
