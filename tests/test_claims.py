"""The papers' claims computed from a comparison's table: held, failed, over seeds, and left out."""

from __future__ import annotations

import pytest

from subspaces.claims import check_claims, render_claims


def cell(error: float, nll: float = 0.3) -> dict:
    return {"acc": 1 - error / 100, "nll": nll}


def table(ind=(12.0, 11.0, 10.5), fge=11.5, single=(12.2, 0.40), mid=(11.9, 0.35), ends=11.8, espro=(11.0, 10.0, 9.9)) -> dict:
    t = {"Ind": {f"{k + 1}B": cell(e) for k, e in enumerate(ind)},
         "Single network": {"1B": cell(*single)},
         "FGE": {"1B": cell(fge)},
         "Line midpoint": {"1B": cell(*mid)},
         "Line (layerwise) midpoint": {"1B": cell(11.0, 0.33)},
         "Line endpoints (ens.)": {"1B": cell(ends)},
         "ESPRO": {f"{k + 1}B": cell(e) for k, e in enumerate(espro)}}
    return t


def by_key(claims):
    return {c.key: c for c in claims}


def test_claims_that_hold():
    claims = by_key(check_claims([table()], [1, 2, 3]))
    assert set(claims) == {"b", "c1", "c1-layerwise", "c2", "d"}
    assert all(c.held and c.held_per_seed == [True] for c in claims.values())
    assert claims["c2"].numbers[0]["gap to Ind(2B)"] == pytest.approx(0.8)
    assert claims["b"].numbers[0] == {"FGE(1B) error": pytest.approx(11.5), "Ind(1B) error": pytest.approx(12.0)}


def test_a_failed_claim_is_reported_as_failed():
    claims = by_key(check_claims([table(fge=12.5, mid=(11.9, 0.45), espro=(11.0, 11.5, 9.9))], [1, 2, 3]))
    assert not claims["b"].held and claims["b"].held_per_seed == [False]
    assert not claims["c1"].held, "the midpoint's NLL is worse: c1 needs error and NLL"
    assert not claims["d"].held, "ESPRO(2) is worse than Ind(2B)"
    assert claims["c2"].held
    text = "\n".join(render_claims(claims.values()))
    assert "(b) FGE(1B) error <= Ind(1B) error ([G] Table 1): **not held**" in text
    assert "(c2)" in text and "**held**" in text


def test_over_seeds_a_claim_holds_on_two_thirds():
    seeds = [table(), table(fge=12.1), table()]
    b = by_key(check_claims(seeds, [1, 2, 3]))["b"]
    assert b.held_per_seed == [True, False, True] and b.seeds_held == 2 and b.held
    assert "2 of 3 seeds" in render_claims([b])[0]
    b = by_key(check_claims([table(fge=12.1), table(fge=12.1), table()], [1, 2, 3]))["b"]
    assert b.seeds_held == 1 and not b.held
    assert b.to_dict()["seeds"] == 3 and b.to_dict()["held"] is False


def test_claims_without_their_rows_are_left_out():
    t = table()
    del t["FGE"], t["ESPRO"], t["Line (layerwise) midpoint"]
    assert set(by_key(check_claims([t], [1, 2, 3]))) == {"c1", "c2"}
    assert render_claims([]) == ["No claim could be checked: the run lacks the rows they compare."]
