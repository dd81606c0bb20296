"""Paired comparisons over seeds, with ρ chosen on one set of seeds and judged on another.

Two methods trained from the same seed share the initialisation and the batch order, so most of the
run-to-run noise cancels in the per-seed difference d_s = score_A(s) − score_B(s). The comparison is
mean(d) ± SE with SE = std(d, ddof=1) / sqrt(n); a claim needs |mean| ≥ 3 SE over ≥ 8 seeds.

Choosing the best ρ and measuring the gain on the same seeds favours whichever method had the luckier
draw at its best ρ (the maximum of noisy means is biased upward), so `select_then_compare` picks each
method's ρ on the selection seeds and reports the paired difference on the evaluation seeds only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# scores[method][rho][seed] -> float; "higher is better" is decided by the caller (pass −loss for losses)
Scores = Mapping[str, Mapping[float, Mapping[int, float]]]


@dataclass(frozen=True)
class Paired:
    """mean ± SE of per-seed differences a − b over the `n` seeds both have."""

    mean: float
    se: float
    n: int
    n_positive: int

    @property
    def z(self) -> float:
        """mean / SE: how many standard errors the difference is from zero (nan when SE is 0 or n < 2)."""
        return self.mean / self.se if self.se > 0 else math.nan


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
    """Per-seed a[s] − b[s] over the seeds in both: mean, standard error (ddof 1), count, count > 0."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds if math.isfinite(a[s]) and math.isfinite(b[s])]
    n = len(diffs)
    if n == 0:
        return Paired(math.nan, math.nan, 0, 0)
    mean = sum(diffs) / n
    if n < 2:
        return Paired(mean, math.nan, n, sum(d > 0 for d in diffs))
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return Paired(mean, math.sqrt(var / n), n, sum(d > 0 for d in diffs))


def best_rho(by_rho: Mapping[float, Mapping[int, float]], seeds: Sequence[int]) -> float:
    """The ρ whose mean score over `seeds` is highest (ties: the smaller ρ); seeds missing a run are skipped."""
    def mean_over(rho: float) -> float:
        values = [by_rho[rho][s] for s in seeds if s in by_rho[rho] and math.isfinite(by_rho[rho][s])]
        return sum(values) / len(values) if values else -math.inf

    return max(sorted(by_rho), key=lambda rho: (mean_over(rho), -rho))


def select_then_compare(scores: Scores, reference: str, select_seeds: Sequence[int],
                        eval_seeds: Sequence[int]) -> dict[str, dict[str, float]]:
    """For every method: its ρ chosen on `select_seeds`, and its paired difference against `reference`
    (at the reference's chosen ρ) on `eval_seeds`. Higher scores are better.

    Returns {method: {"rho", "mean", "se", "n", "n_positive", "z"}}; the reference's own row has
    difference 0.
    """
    if set(select_seeds) & set(eval_seeds):
        raise ValueError("eval_seeds: must not overlap select_seeds (ρ is chosen on one set, judged on the other)")
    chosen = {method: best_rho(by_rho, select_seeds) for method, by_rho in scores.items()}
    ref = {s: v for s, v in scores[reference][chosen[reference]].items() if s in set(eval_seeds)}
    rows = {}
    for method, by_rho in scores.items():
        own = {s: v for s, v in by_rho[chosen[method]].items() if s in set(eval_seeds)}
        p = paired_difference(own, ref)
        rows[method] = {"rho": chosen[method], "mean": p.mean, "se": p.se, "n": p.n,
                        "n_positive": p.n_positive, "z": p.z}
    return rows
