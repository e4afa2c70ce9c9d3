"""The CPU buffer pool: storage for the mixed weights and the anchors' gradients reused across steps.

On CPU a fresh tensor of tens of MB is new zeroed pages every step (glibc maps tensors above
32 MiB afresh and trims the heap when large blocks are freed), and faulting them in can cost more
than the arithmetic that writes them (docs/performance.md §3). A :class:`BufferPool` keeps the
storage it handed out last and hands it out again only when nothing else references it, so reuse
is never observable.

Knowing "nothing else references it" needs one private call of torch,
``torch._C._storage_Use_Count``; :func:`pooling_available` says whether this torch has it (and
warns when it does not). The switch that turns the pool on or off is
:data:`subspaces.subspace.POOLING`; ``tests/test_bench.py`` fails if the pool is off while the
call is present.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

#: the pool's key for the mixed weights; keys k >= 0 hold anchor k's gradient
MIXED = -1


class BufferPool:
    """Flat storages of one anchor group reused across steps on CPU: the mixed weights (key
    :data:`MIXED`) and each trainable anchor's gradient (key k).

    Contract: :meth:`take` returns an uninitialised tensor whose storage only this pool holds;
    the storage handed out last for a key is handed out again only when nothing else references
    it (the gradient was dropped by ``zero_grad`` and no one kept it; no autograd graph or user
    variable holds the last mixed weights), else a fresh one. Copies and pickles start empty.

    It also keeps the per-parameter gradients dL/dw that autograd hands to the backward
    (``incoming``) until the next mix. Freed at the end of the backward, they would leave tens
    of MB free at the top of the heap, which glibc gives back to the kernel, and the next
    backward would fault them in again. Kept, the subspace's allocations follow the plain
    model's pattern (a plain model keeps its gradients until ``zero_grad``); the peak is
    unchanged.
    """

    def __init__(self) -> None:
        self.storages: dict[int, Any] = {}
        self.incoming: tuple[Tensor | None, ...] | None = None

    def __deepcopy__(self, memo: dict) -> BufferPool:
        return BufferPool()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.storages = {}
        self.incoming = None

    def take(self, key: int, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape`` / ``dtype`` on a storage only this pool holds (reused or fresh)."""
        storage = self.storages.pop(key, None)
        if (
            storage is not None
            and storage.device == device
            and storage.nbytes() == math.prod(shape) * dtype.itemsize
            and torch._C._storage_Use_Count(storage._cdata) == 1   # nothing else holds it
        ):
            out = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)
        else:
            out = torch.empty(shape, dtype=dtype, device=device)
        self.storages[key] = out.untyped_storage()
        return out

    def release_gradients(self) -> None:
        """Forget the gradients' storages (evaluation: hand their memory back)."""
        for key in [k for k in self.storages if k >= 0]:
            del self.storages[key]
        self.incoming = None


def pooling_available() -> bool:
    """Whether this torch has the one private call the pool needs (``torch._C._storage_Use_Count``:
    how many tensors hold a storage). Without it the pool is off, visibly: a RuntimeWarning says
    so. Results are the same either way; CPU steps are slower without it (docs/performance.md)."""
    if callable(getattr(torch._C, "_storage_Use_Count", None)):
        return True
    warnings.warn(
        "torch._C._storage_Use_Count is missing in torch " + torch.__version__ + ": subspaces' CPU buffer pool is off "
        "(same results; CPU training steps re-allocate the mixed weights and anchor gradients every step, slower)",
        RuntimeWarning,
        stacklevel=2,
    )
    return False
