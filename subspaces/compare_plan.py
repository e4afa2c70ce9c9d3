"""The comparison's plan: every derived number of the protocol, a pure function of its settings.

:func:`make_plan` turns the compare's settings (the flags of ``recipes/compare.py``) and the size
of the training set into a :class:`Plan` (updates per epoch, FGE's start and cycle, SSE's cycle,
ESPRO's simplexes: each method derives its own, :meth:`~subspaces.method_registry.CompareMethod.derive`)
and :func:`accounting` into the budget accounting printed with the results (each method's lines);
nothing here trains or reads a file, so a plan is testable without training (docs/science.md §7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import methods  # noqa: F401  (registers the built-in methods)
from .errors import ConfigError
from .method_registry import check_methods, get_method, method_names, row_method, seed_offsets
from .settings import CompareConfig
from .snapshots import updates_per_epoch

#: flags that describe the job, not the protocol: a restarted compare may change them
JOB_KEYS = ("seeds", "output", "resume", "stop_after_runs", "log_interval", "workers", "eval_batch_size", "cpu", "config",
            "threads", "jobs")

#: replicate r uses seeds seed + SEED_STRIDE * r; within it each method's members start at OFFSETS[method]
SEED_STRIDE = 1000
#: method -> seed offset, a live read-only view of the registry (:func:`subspaces.method_registry.seed_offsets`)
OFFSETS = seed_offsets()

@dataclass
class Plan:
    """Every derived number of the protocol, in iterations (optimiser updates) where it matters."""

    B: int                         # epochs of one standard network
    upe: int                       # updates per epoch
    budgets: list[int]             # multiples of B reported (e.g. 1, 2, 3)
    subspace_budgets: list[int]    # budgets at which a line / simplex is trained from scratch
    methods: list[str]
    pretrain_iter: int             # FGE starts from Ind network 0 after this many iterations
    fge_cycle: int = 0
    fge_epochs: int = 0            # epochs of the FGE run (the last may go past the budget; unused)
    sse_cycle: int = 0
    sse_epochs: int = 0
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
        """Training cost of a table cell in B (``row`` an identifier or a display name): its
        method's :meth:`~subspaces.method_registry.CompareMethod.cost`, k for every built-in
        method but ESPRO, which adds its SPRO epochs."""
        return row_method(row).method.cost(self, k)


def budget_list(text: str, what: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]: positive whole multiples of B, sorted, each once (ConfigError otherwise)."""
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated whole numbers, e.g. 1,2,3; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--{what} {text!r}: give positive whole multiples of the budget B, e.g. 1,2,3")
    return sorted(set(values))


def in_table_order(names: list[str]) -> list[str]:
    """``names`` in the registry's order (the table's), whatever order ``--methods`` gave."""
    return [m for m in method_names() if m in names]


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
    chosen = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    check_methods(chosen)
    if "ind" not in chosen:
        chosen.insert(0, "ind")
    budgets = budget_list(args.budgets, "budgets")
    sub_budgets = budget_list(args.subspace_budgets, "subspace-budgets")
    if not 0 < args.fge_pretrain < 1:
        raise ConfigError(f"--fge-pretrain {args.fge_pretrain}: the fraction of B before FGE starts must be in (0, 1) ([G]: 0.8)")
    B = args.epochs
    upe = updates_per_epoch(num_train, args.batch_size, 1, args.grad_accum_steps)
    pre = round(args.fge_pretrain * B * upe)
    if pre < 1:
        raise ConfigError(f"--fge-pretrain {args.fge_pretrain} of {B * upe} iterations leaves FGE no pre-training")
    fields: dict[str, Any] = {}
    notes: list[str] = []
    for name in in_table_order(chosen):
        derived, said = get_method(name).method.derive(args, B, upe, budgets, pre)
        fields.update(derived)
        notes += said
    return Plan(B=B, upe=upe, budgets=budgets, subspace_budgets=sub_budgets, methods=chosen, pretrain_iter=pre, notes=notes, **fields)


def accounting(plan: Plan, args: CompareConfig) -> list[str]:
    """The budget accounting, one line per method (printed and written to results.md)."""
    Bi, u = plan.budget_iters, plan.upe
    ks = ", ".join(f"{k}B" for k in plan.budgets)
    lines = [f"B = {plan.B} epochs of {args.train_subset or 'all'} training examples = {Bi} iterations "
             f"({u} per epoch, batch {args.batch_size}); budgets {ks}."]
    for name in in_table_order(plan.methods):
        lines += get_method(name).method.accounting(plan, args)
    lines.append(f"BatchNorm recomputed at every evaluated network (the Ind networks, snapshots, averages and subspace points) on "
                 f"{args.bn_batches} batches of unaugmented training images, weighted by samples; ensembles average probabilities.")
    return lines + plan.notes


def protocol_of(args: CompareConfig) -> dict[str, Any]:
    """The settings that decide the comparison's results (all but the job's, :data:`JOB_KEYS`)."""
    return {k: v for k, v in sorted(args.to_dict().items()) if k not in JOB_KEYS}
