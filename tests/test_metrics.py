import math

import pytest
import torch

from subspaces.metrics import ClassificationMetrics, metrics_from_probs


def _probs_with_confidence(
    n: int, conf: float, num_classes: int, correct: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows predicting class 0 with probability conf (rest spread evenly); the first
    `correct` targets are 0, the others 1."""
    probs = torch.full((n, num_classes), (1 - conf) / (num_classes - 1), dtype=torch.float64)
    probs[:, 0] = conf
    target = torch.ones(n, dtype=torch.long)
    target[:correct] = 0
    return probs, target


def test_ece_known_values_single_confidence():
    probs, target = _probs_with_confidence(10, 0.8, 3, correct=8)
    assert metrics_from_probs(probs, target)["ece"] == pytest.approx(0.0, abs=1e-6)
    probs, target = _probs_with_confidence(10, 0.8, 3, correct=5)
    assert metrics_from_probs(probs, target)["ece"] == pytest.approx(0.3, abs=1e-6)


def test_ece_two_bins_weighted_by_bin_size():
    # 10 examples at confidence 0.8, all correct (gap 0.2); 30 at 0.55, 6 correct (gap 0.35).
    p1, t1 = _probs_with_confidence(10, 0.8, 4, correct=10)
    p2, t2 = _probs_with_confidence(30, 0.55, 4, correct=6)
    m = metrics_from_probs(torch.cat([p1, p2]), torch.cat([t1, t2]))
    assert m["ece"] == pytest.approx(0.25 * 0.2 + 0.75 * 0.35, abs=1e-6)
    assert m["acc"] == pytest.approx(16 / 40)
    assert m["count"] == 40


def test_nll_brier_accuracy_known_values():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    target = torch.tensor([0, 2, 1, 0])
    m = metrics_from_probs(probs, target)
    assert m["acc"] == pytest.approx(1 / 4)
    # last row gives p_y = 0: clamped to float32's tiny, so a large but finite NLL
    tiny = torch.finfo(torch.float32).tiny
    expected_nll = (-math.log(0.7) - math.log(0.3) - math.log(0.25) - math.log(tiny)) / 4
    assert m["nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert math.isfinite(m["nll"])
    brier = [
        0.3**2 + 0.2**2 + 0.1**2,
        0.1**2 + 0.6**2 + 0.7**2,
        0.5**2 + 0.75**2 + 0.25**2,
        1.0 + 0.0 + 1.0,
    ]
    assert m["brier"] == pytest.approx(sum(brier) / 4, rel=1e-6)
    assert set(m) == {"acc", "nll", "ece", "brier", "count"}


def test_streaming_over_chunks_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(257, 10, generator=g), dim=-1)
    target = torch.randint(0, 10, (257,), generator=g)
    one_shot = metrics_from_probs(probs, target)
    stream = ClassificationMetrics(num_classes=10)
    for chunk_p, chunk_t in zip(probs.split(50), target.split(50)):
        stream.update(chunk_p, chunk_t)
    streamed = stream.compute()
    assert streamed["count"] == one_shot["count"] == 257
    for key in ("acc", "nll", "ece", "brier"):
        assert streamed[key] == pytest.approx(one_shot[key], rel=1e-6, abs=1e-7), key
    # the reference values are not trivial
    assert 0 < one_shot["ece"] < 1 and one_shot["nll"] > 0

    stream.reset()
    stream.update(probs[:5], target[:5])
    assert stream.compute() == pytest.approx(metrics_from_probs(probs[:5], target[:5]))


def test_rejects_logits_and_shape_errors():
    metric = ClassificationMetrics(num_classes=3)
    with pytest.raises(ValueError, match="softmax"):
        metric.update(torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="softmax"):
        metric.update(torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_classes"):
        metric.update(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="target"):
        metric.update(torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError):
        metric.compute()
