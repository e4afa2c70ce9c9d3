"""What the compared methods share: their members' seeds, the names of points on a shape, and
the compare's progress lines."""

from __future__ import annotations

import re
import sys
from typing import Any

import torch
from torch import Tensor

from ..method_registry import CompareMethod, Member, seed_offsets


def log(msg: str) -> None:
    """A line of the compare's own output, on stderr: ``[compare] msg``."""
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def member_seed(method: str, replicate_seed: int, index: int = 0) -> int:
    """The seed of member ``index`` of ``method`` in the replicate of seed ``replicate_seed``:
    replicate_seed + the method's seed offset + index (Ind network j, the budget k of a shape)."""
    return int(replicate_seed) + seed_offsets()[method] + int(index)


def draw_seed(kind: str, replicate_seed: int, index: int) -> int:
    """The seed of the random points a replicate evaluates on a shape (``kind`` "simplex": the
    simplex trained at budget ``index``; "espro": the SPRO simplex of Ind network ``index``)."""
    return member_seed(kind, replicate_seed, index)


def point_key(point: Tensor | float) -> str:
    """A network's name from its point: ``t=0.2500`` on a curve, ``p=0.3333,...`` on a simplex."""
    p = torch.as_tensor(point).flatten()
    if p.numel() == 1:
        return f"t={float(p):.4f}"
    return "p=" + ",".join(f"{float(v):.4f}" for v in p)


class IndexedMembers(CompareMethod):
    """A method with one member per Ind network j < the largest budget, ``{prefix}{j}``
    (:meth:`indexed_member` builds member j)."""

    prefix: str

    def members(self, plan: Any) -> list[Member]:
        return [self.indexed_member(plan, j) for j in range(max(plan.budgets))]

    def member(self, plan: Any, name: str) -> Member | None:
        found = re.fullmatch(rf"{re.escape(self.prefix)}(\d+)", name)
        return self.indexed_member(plan, int(found[1])) if found else None

    def indexed_member(self, plan: Any, j: int) -> Member:
        raise NotImplementedError(f"{type(self).__name__} builds no indexed member")
