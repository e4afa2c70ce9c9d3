"""The compared methods of ``recipes/compare.py``, one file each, registered here in the table's
order (:mod:`subspaces.method_registry`): a new built-in method is one new file and one line below.

Importing this package registers them; :mod:`subspaces.compare_plan` does, so every part of the
compare sees them."""

from __future__ import annotations

from ..method_registry import register_method
from .espro import ESPRO
from .ind import Ind
from .lines import LineFromScratch
from .simplex import SimplexFromScratch
from .snapshots import SWA, Snapshots

__all__ = ["ESPRO", "Ind", "LineFromScratch", "SWA", "SimplexFromScratch", "Snapshots"]

register_method("ind", Ind(), seed_offset=0)
register_method("sse", Snapshots("sse"), seed_offset=10)
register_method("fge", Snapshots("fge"), seed_offset=20)
register_method("swa", SWA())
register_method("line", LineFromScratch(), seed_offset=30)
register_method("layerwise", LineFromScratch(layerwise=True), seed_offset=60)
register_method("simplex", SimplexFromScratch(), seed_offset=40)
register_method("espro", ESPRO(), seed_offset=50)
