"""Classification metrics computed from predicted probabilities.

All metrics take *probabilities* (rows of a softmax, or an average of softmaxes for an
ensemble), never logits. Accumulation is purely local to the process: under
``accelerate`` the caller gathers probabilities and targets with
``accelerator.gather_for_metrics`` before :meth:`ClassificationMetrics.update`; the
torchmetrics objects used internally are built with ``sync_on_compute=False`` so nothing
is gathered twice.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Tolerance on |sum_c p_c - 1| used to reject logits passed where probabilities belong.
_ROW_SUM_TOL = 1e-3


def _as_probs(probs: Tensor, target: Tensor, num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """Validate and normalise an update: probs [N, C] floating in [0, 1], rows summing to 1;
    target [N] integer labels. Low-precision floats are promoted to float32."""
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [N, C], got {tuple(probs.shape)}")
    if target.ndim != 1 or target.shape[0] != probs.shape[0]:
        raise ValueError(
            f"target must have shape [N] = [{probs.shape[0]}] to match probs, got {tuple(target.shape)}"
        )
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(
            f"probs has {probs.shape[1]} classes but the metric was built with num_classes={num_classes}"
        )
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating tensor, got {probs.dtype}")
    if probs.dtype in (torch.float16, torch.bfloat16):
        probs = probs.float()
    probs = probs.detach()
    target = target.detach().long()
    if probs.numel() > 0:
        bad_range = bool((probs < 0).any() or (probs > 1).any())
        bad_sum = bool(((probs.sum(dim=1) - 1).abs() > _ROW_SUM_TOL).any())
        if bad_range or bad_sum:
            raise ValueError(
                "probs must be probabilities (each row in [0, 1] summing to 1); "
                "got values that look like logits - pass probs=logits.softmax(dim=-1)"
            )
    return probs, target


def nll_per_example(probs: Tensor, target: Tensor) -> Tensor:
    """Negative log-likelihood of the true class: -log max(p_{n, y_n}, eps), with
    eps = finfo(dtype).tiny. probs [N, C], target [N] -> [N]."""
    p_true = probs.gather(1, target.unsqueeze(1)).squeeze(1)
    return -p_true.clamp_min(torch.finfo(probs.dtype).tiny).log()


def brier_per_example(probs: Tensor, target: Tensor) -> Tensor:
    """Multiclass Brier score: sum_c (p_{n, c} - 1[c = y_n])^2.
    probs [N, C], target [N] -> [N]."""
    onehot = torch.nn.functional.one_hot(target, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(dim=1)


class ClassificationMetrics:
    """Streaming accuracy, NLL, top-label ECE and Brier score over batches of probabilities.

    acc   = mean_n 1[argmax_c p_{n,c} = y_n]                    (torchmetrics, micro)
    nll   = mean_n -log max(p_{n, y_n}, eps)
    ece   = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|, conf = max_c p_{n,c}, n_bins equal-width
            bins on [0, 1] (torchmetrics MulticlassCalibrationError, L1)
    brier = mean_n sum_c (p_{n,c} - 1[c = y_n])^2
    count = N
    Ties in argmax resolve to the lowest class index (torch.max/argmax semantics).
    """

    def __init__(self, num_classes: int, n_bins: int = 15) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.num_classes = num_classes
        self.n_bins = n_bins
        # imported here: torchmetrics costs seconds at import, which every recipe's --help would pay
        from torchmetrics.aggregation import MeanMetric
        from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

        common = dict(sync_on_compute=False)
        self._acc = MulticlassAccuracy(num_classes=num_classes, average="micro", **common)
        self._ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=n_bins, norm="l1", **common)
        self._nll = MeanMetric(**common)
        self._brier = MeanMetric(**common)
        self._count = 0

    def _metrics(self) -> tuple:
        return (self._acc, self._ece, self._nll, self._brier)

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch: probs [N, C] (probabilities), target [N] class indices. Local only."""
        probs, target = _as_probs(probs, target, self.num_classes)
        if probs.shape[0] == 0:
            return
        for metric in self._metrics():
            if metric.device != probs.device:
                metric.to(probs.device)
        self._acc.update(probs, target)
        self._ece.update(probs, target)
        self._nll.update(nll_per_example(probs, target))
        self._brier.update(brier_per_example(probs, target))
        self._count += int(probs.shape[0])

    def compute(self) -> dict[str, float]:
        """Return {'acc', 'nll', 'ece', 'brier', 'count'} over everything seen since reset()."""
        if self._count == 0:
            raise RuntimeError("ClassificationMetrics.compute() called before any update() with data")
        return {
            "acc": float(self._acc.compute()),
            "nll": float(self._nll.compute()),
            "ece": float(self._ece.compute()),
            "brier": float(self._brier.compute()),
            "count": self._count,
        }

    def reset(self) -> None:
        """Forget all accumulated batches."""
        for metric in self._metrics():
            metric.reset()
        self._count = 0


def metrics_from_probs(probs: Tensor, target: Tensor, n_bins: int = 15) -> dict[str, float]:
    """One-shot :class:`ClassificationMetrics` on probs [N, C] and target [N]
    (num_classes = C)."""
    metrics = ClassificationMetrics(num_classes=probs.shape[-1], n_bins=n_bins)
    metrics.update(probs, target)
    return metrics.compute()
