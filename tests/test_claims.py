"""The papers' claims computed from a comparison's per-example test predictions: held,
contradicted, not resolved, over replicates, and left out when their rows are missing."""

from __future__ import annotations

import torch

from subspaces.claims import check_claims, render_claims
from subspaces.compare_eval import per_example_losses
from subspaces.stats import CONTRADICTED, HELD, NOT_RESOLVED, Bootstrap

N, C = 3000, 10
LABELS = torch.arange(N) % C


def probs(error: float, seed: int, confidence: float = 0.7) -> torch.Tensor:
    """[1, N, C] probabilities wrong on a random ``error`` fraction of the examples (the wrong
    ones put ``confidence`` on the next class), right elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    wrong = torch.rand(N, generator=gen) < error
    top = torch.where(wrong, (LABELS + 1) % C, LABELS)
    p = torch.full((N, C), (1 - confidence) / (C - 1))
    p[torch.arange(N), top] = confidence
    return p[None]


def rows(ind=(0.20, 0.17, 0.16), fge=0.12, single=0.21, mid=0.15, layerwise=0.21, ends=0.20, espro=(0.15, 0.13, 0.12), seed=0) -> dict:
    out = {("Ind", k + 1): probs(e, seed + k) for k, e in enumerate(ind)}
    out[("Single network", 1)] = torch.cat([probs(single, seed + 10 + j) for j in range(3)])
    out[("FGE", 1)] = probs(fge, seed + 20)
    out[("Line midpoint", 1)] = probs(mid, seed + 30, confidence=0.8)
    out[("Line (layerwise) midpoint", 1)] = probs(layerwise, seed + 40)
    out[("Line endpoints (ens.)", 1)] = probs(ends, seed + 50)
    out.update({("ESPRO", k + 1): probs(e, seed + 60 + k) for k, e in enumerate(espro)})
    return out


def claims_of(replicates: list[dict]) -> dict:
    boot = Bootstrap(len(replicates), N, resamples=1000, seed=0)
    return {c.key: c for c in check_claims(replicates, LABELS, [1, 2, 3], boot, per_example_losses)}


def test_three_way_verdicts_from_predictions():
    claims = claims_of([rows()])
    assert list(claims) == ["b", "c1", "c1-layerwise", "c2", "d"]
    assert claims["b"].verdict == HELD            # 12 % against 20 % on 3000 examples
    assert claims["c1"].verdict == HELD           # error and NLL both lower
    assert [p.metric for p in claims["c1"].parts] == ["error", "nll"]
    assert claims["c1-layerwise"].verdict == NOT_RESOLVED   # 21 % against 21 %
    assert claims["c2"].verdict == NOT_RESOLVED   # 20 % against 20 %
    assert [p.informative for p in claims["c2"].parts] == [False, True]   # the gap to Ind(2B) is reported only
    assert claims["d"].verdict == HELD
    d = claims["b"].parts[0].difference
    assert d.lo <= d.value <= d.hi < 0 and abs(d.value - (-8.0)) < 2.5


def test_a_contradicted_part_contradicts_the_claim():
    claims = claims_of([rows(fge=0.30, espro=(0.15, 0.13, 0.25))])
    assert claims["b"].verdict == CONTRADICTED
    assert [p.verdict for p in claims["d"].parts] == [HELD, HELD, CONTRADICTED]
    assert claims["d"].verdict == CONTRADICTED


def test_over_replicates_the_verdict_uses_every_replicate():
    claims = claims_of([rows(seed=0), rows(seed=100), rows(seed=200)])
    assert claims["b"].verdict == HELD
    assert len(claims["b"].parts) == 1


def test_claims_without_their_rows_are_left_out():
    table = rows()
    for key in [("FGE", 1), ("ESPRO", 1), ("ESPRO", 2), ("ESPRO", 3)]:
        del table[key]
    assert set(claims_of([table])) == {"c1", "c1-layerwise", "c2"}
    assert render_claims([], 1) == ["No claim could be checked: the run lacks the rows they compare."]


def test_rendered_claims_show_the_differences_and_the_verdicts():
    lines = render_claims(list(claims_of([rows()]).values()), 1)
    assert lines[0].startswith("- (b) FGE(1B) error < Ind(1B) error ([G] Table 1): **held**.")
    assert "[" in lines[0] and "]" in lines[0]
    assert "not resolved at this scale" in lines[2]
    assert "(reported)" in lines[3]
    assert "95 % paired bootstrap intervals" in lines[-1]
