"""Paired differences over seeds and ρ chosen on other seeds, against hand computations."""

from __future__ import annotations

import math

import pytest

from samlab.paired import best_rho, paired_difference, select_then_compare


def test_paired_difference_by_hand():
    # per-seed differences 1, 3, 2, 6 (seed 9 only in a: left out): mean 3, sample variance
    # ((−2)² + 0² + (−1)² + 3²)/3 = 14/3, SE = sqrt(14/3 / 4)
    a = {0: 11.0, 1: 13.0, 2: 12.0, 3: 16.0, 9: 100.0}
    b = {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0}
    p = paired_difference(a, b)
    assert p.n == 4 and p.n_positive == 4
    assert p.mean == pytest.approx(3.0)
    assert p.se == pytest.approx(math.sqrt(14 / 3 / 4))
    assert p.z == pytest.approx(3.0 / math.sqrt(14 / 12))


def test_paired_difference_edge_cases():
    one = paired_difference({0: 2.0}, {0: 1.0})
    assert one.n == 1 and one.mean == 1.0 and math.isnan(one.se) and math.isnan(one.z)
    none = paired_difference({0: 2.0}, {1: 1.0})
    assert none.n == 0 and math.isnan(none.mean)
    same = paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same.mean == 0 and same.se == 0 and math.isnan(same.z)


def test_rho_is_chosen_on_the_selection_seeds_and_judged_on_the_others():
    # on seeds 0, 1 ρ = 0.2 looks best for "m=8" (a lucky draw); on seeds 2, 3 it is ρ = 0.1 that is good
    scores = {
        "m=64": {0.3: {0: 1.0, 1: 1.0, 2: 1.0, 3: 2.0}},
        "m=8": {0.1: {0: 1.5, 1: 1.5, 2: 3.0, 3: 5.0}, 0.2: {0: 9.0, 1: 9.0, 2: 0.0, 3: 1.0}},
    }
    rows = select_then_compare(scores, "m=64", [0, 1], [2, 3])
    assert rows["m=8"]["rho"] == 0.2
    # judged on seeds 2, 3 at ρ = 0.2: differences −1, −1
    assert rows["m=8"]["mean"] == pytest.approx(-1.0) and rows["m=8"]["se"] == 0.0
    assert rows["m=64"]["mean"] == 0.0 and rows["m=64"]["n"] == 2
    assert best_rho(scores["m=8"], [2, 3]) == 0.1
    with pytest.raises(ValueError, match="eval_seeds"):
        select_then_compare(scores, "m=64", [0, 1], [1, 2])
