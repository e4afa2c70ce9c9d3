"""The permutation spec: which tensor axes of a network are permuted together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PermutationSpec"]


@dataclass
class PermutationSpec:
    """Groups of tensor axes permuted together.

    ``groups[g]``: the (state_dict name, axis) pairs of group g, all of length ``sizes[g]``;
    ``axes[name]``: per axis of that tensor, its group index or None (not permuted);
    ``fixed``: (layer, reason) for each place that stopped channels from being permuted;
    ``unanalysed``: (layer, reason) for each operation the walker does not know (its inputs and
    outputs were left in place; the first one is what stops a model that cannot be aligned).
    """

    groups: list[list[tuple[str, int]]]
    sizes: list[int]
    axes: dict[str, list[int | None]]
    fixed: list[tuple[str, str]] = field(default_factory=list)
    unanalysed: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.groups)

    def summary(self) -> str:
        """One line: groups, permuted channels, places left in place, unanalysed operations."""
        permuted = sum(self.sizes)
        line = f"{len(self.groups)} permutation groups ({permuted} channels); {len(self.fixed)} places left in place"
        if self.unanalysed:
            where, why = self.unanalysed[0]
            line += f"; {len(self.unanalysed)} operations not analysed (first: {where}: {why})"
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: group sizes, each group's first member, the fixed and unanalysed places."""
        return {"groups": len(self.groups), "channels": sum(self.sizes), "sizes": list(self.sizes),
                "fixed": [list(f) for f in self.fixed], "unanalysed": [list(u) for u in self.unanalysed]}
