"""Sweeps: a group of training runs over m × ρ × seeds × methods, aggregated into tidy tables.

A sweep is built from a base RunConfig (`SweepSpec`, `sweep_configs`) and submitted through the run
store as one group (`samlab.runs.sweeps.submit`): every member is an ordinary "train" run with its
metrics, summary and checkpoint in the store.

`aggregate(store, group_id)` turns the finished runs into pandas tables: per-run rows, the m × ρ
heatmap, the best ρ per m (ρ tuned per m on the mean final test accuracy over seeds: the selection
uses the test split, there is no separate validation split) with mean ± std over seeds and the seed
count, the generalization gap against m, and reference rows for SGD, n-SAM and RW-SAM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from samlab.config import RunConfig, preset
from samlab.paired import paired_difference
from samlab.runs.store import Store, open_store
from samlab.validation import check_rho_grid

SWEEP_METHODS = ("sgd", "sam", "nsam", "msam", "ghostbn", "rwsam")


@dataclass
class SweepSpec:
    """A grid of runs around `base`: methods × (ms for msam) × rhos × seeds.

    sgd runs once per seed; sam, nsam and rwsam once per ρ and seed (rwsam with λ = `lam`); msam once
    per m < batch size, ρ and seed (m = batch size is plain SAM: the "sam" runs stand for it).
    `rhos_by_m` gives the sam / msam runs of one m their own ρ grid (key: m, the batch size for sam;
    m without an entry use `rhos`, as do nsam and rwsam). Normalised m-SAM moves each micro-batch
    by the full radius ρ along that micro-batch's own gradient, so the best ρ shrinks with m and
    one shared grid tends to bracket the optimum of one end only.
    Seeds change the training seed only (initialisation and batch order); the data split and any
    label noise stay those of `base.data.data_seed`.
    """

    base: RunConfig
    ms: list[int]
    rhos: list[float]
    seeds: list[int]
    methods: list[str] = field(default_factory=lambda: ["sgd", "sam", "nsam", "msam"])
    lam: float = 1.0
    name: str = "sweep"
    rhos_by_m: dict[int, list[float]] = field(default_factory=dict)

    def rhos_for(self, m: int) -> list[float]:
        """The ρ grid of SAM / m-SAM at micro-batch size m (m = batch size: SAM)."""
        return self.rhos_by_m.get(m, self.rhos)

    def validate(self) -> SweepSpec:
        self.base.validate()
        if not self.methods or any(m not in SWEEP_METHODS for m in self.methods):
            raise ValueError(f"methods: choose from {', '.join(SWEEP_METHODS)} (got {self.methods!r})")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: each method once (got {self.methods!r})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: a non-empty list of distinct seeds (got {self.seeds!r})")
        b = self.base.batch_size
        if {"msam", "ghostbn"} & set(self.methods):
            if not self.ms:
                raise ValueError("ms: msam and ghostbn need at least one micro-batch size m")
            for m in self.ms:
                if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= b or b % m:
                    raise ValueError(f"ms: every m must divide batch_size={b} (got {m!r})")
        self._validate_rhos(b)
        if "rwsam" in self.methods and not self.lam > 0:
            raise ValueError(f"lam: RW-SAM needs λ > 0 (λ = 0 is SAM), got {self.lam!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("name: a sweep needs a non-empty name")
        return self

    def _validate_rhos(self, batch_size: int) -> None:
        grid_ms = set(self.ms) if "msam" in self.methods else set()
        grid_ms |= {batch_size} if "sam" in self.methods else set()
        if not isinstance(self.rhos_by_m, dict):
            raise ValueError(f"rhos_by_m: a mapping m -> list of ρ (got {self.rhos_by_m!r})")
        for m, rhos in self.rhos_by_m.items():
            if m not in grid_ms:
                raise ValueError(f"rhos_by_m: m={m!r} is not swept (sam stands for m={batch_size}; "
                                 f"msam m values: {sorted(self.ms)})")
            check_rho_grid(f"rhos_by_m[{m}]", rhos)
        uses_shared = ({"nsam", "rwsam"} & set(self.methods)) or any(m not in self.rhos_by_m for m in grid_ms)
        if uses_shared or self.rhos:
            check_rho_grid("rhos", self.rhos)


def sweep_configs(spec: SweepSpec) -> list[RunConfig]:
    """The member configs of a sweep, seeds innermost (so early results cover every cell)."""
    spec.validate()
    cells: list[dict[str, Any]] = []
    for method in spec.methods:
        if method == "sgd":
            cells.append({"optim.method": "sgd", "optim.m": None})
        elif method in ("msam", "ghostbn"):
            # ghostbn keeps SAM's one perturbation (only its BatchNorm statistics are per micro-batch), so
            # it runs on SAM's ρ grid; msam on the grid of its own m
            cells += [{"optim.method": method, "optim.m": m, "optim.rho": float(rho)}
                      for m in sorted(set(spec.ms), reverse=True) if m < spec.base.batch_size
                      for rho in spec.rhos_for(m if method == "msam" else spec.base.batch_size)]
        else:
            rhos = spec.rhos_for(spec.base.batch_size) if method == "sam" else spec.rhos
            extra = {"optim.lam": float(spec.lam)} if method == "rwsam" else {}
            cells += [{"optim.method": method, "optim.m": None, "optim.rho": float(rho)} | extra
                      for rho in rhos]
    return [spec.base.with_overrides(cell | {"seed": seed, "name": spec.name}).validate()
            for cell in cells for seed in spec.seeds]


# -- the lesson's sweeps ----------------------------------------------------------------------------
# m-sharpness on a neural network: the relu-msharp preset (full batch of 60, so SAM is n-SAM as well).
# Each cell runs at the one ρ that benchmarks/msharp_search.py chose on training seeds 0-3 (candidate
# relu-student-noisy-grid); the lesson's runs use the other seeds, 4-11, so the comparison is not made on
# the seeds the ρ were picked on.
LESSON_SWEEP_NAME = "lesson: m-sharpness on a ReLU network"
LESSON_PRESET = "relu-msharp"
LESSON_RHOS_BY_M = {60: [0.03], 20: [0.1], 6: [0.3], 2: [0.03]}
LESSON_RWSAM = {"lam": 3.0, "rho": 0.003}
LESSON_SEEDS = list(range(4, 12))
# The BatchNorm control on the lesson's digits CNN (digits-cnn-msharp, batch 64): SAM, m-SAM at m = 8 and
# the ghost-BatchNorm control at m = 8 (m-SAM's normalisation, SAM's single perturbation), RW-SAM beside.
# ρ (and RW-SAM's λ) chosen on seeds 0-3 by benchmarks/msharp_search.py (candidate digits-cnn-rwsam).
CONTROL_SWEEP_NAME = "lesson: BatchNorm control on digits"
CONTROL_PRESET = "digits-cnn-msharp"
CONTROL_RHOS_BY_M = {64: [0.28], 8: [0.14]}
CONTROL_RWSAM = {"lam": 0.01, "rho": 0.28}


def lesson_spec(seeds: Sequence[int] = tuple(LESSON_SEEDS)) -> SweepSpec:
    """The lesson's m-sharpness sweep: SGD, SAM (m = 60), m-SAM at m = 20, 6, 2 and RW-SAM on `relu-msharp`."""
    return SweepSpec(preset(LESSON_PRESET), ms=sorted(LESSON_RHOS_BY_M, reverse=True), rhos=[LESSON_RWSAM["rho"]],
                     seeds=list(seeds), methods=["sgd", "sam", "msam", "rwsam"], lam=LESSON_RWSAM["lam"],
                     name=LESSON_SWEEP_NAME, rhos_by_m={m: list(r) for m, r in LESSON_RHOS_BY_M.items()})


def control_spec(seeds: Sequence[int] = tuple(LESSON_SEEDS)) -> SweepSpec:
    """The lesson's BatchNorm control: SAM, m-SAM and ghostbn at m = 8, RW-SAM, on `digits-cnn-msharp`."""
    return SweepSpec(preset(CONTROL_PRESET), ms=sorted(CONTROL_RHOS_BY_M, reverse=True),
                     rhos=[CONTROL_RWSAM["rho"]], seeds=list(seeds), methods=["sam", "msam", "ghostbn", "rwsam"],
                     lam=CONTROL_RWSAM["lam"], name=CONTROL_SWEEP_NAME,
                     rhos_by_m={m: list(r) for m, r in CONTROL_RHOS_BY_M.items()})


# -- aggregation ----------------------------------------------------------------------------------
@dataclass
class SweepTables:
    """Tidy tables of one sweep (see `aggregate`)."""

    runs: pd.DataFrame
    heatmap: pd.DataFrame
    best_by_m: pd.DataFrame
    references: pd.DataFrame
    batch_size: int | None
    ghost_by_m: pd.DataFrame = field(default_factory=pd.DataFrame)
    regression: bool = False  # score = −test loss (regression) instead of test accuracy

    @property
    def score_name(self) -> str:
        return "test loss" if self.regression else "test accuracy"


RUN_COLUMNS = ["run_id", "status", "method", "m", "rho", "lam", "seed", "test_acc", "train_acc", "gap",
               "test_loss", "train_loss", "wall_time", "score"]


def aggregate(store: Store | str | None, group_id: str) -> SweepTables:
    """Aggregate a sweep's finished runs.

    - runs: one row per run (final test/train accuracy and loss from the run's summary; m is the
      number of samples per perturbation: msam's m, the batch size for sam, NaN otherwise).
    - heatmap: m × ρ cells of sam/msam runs: mean and std of test accuracy over completed seeds, n.
    - best_by_m: for each m the ρ with the highest mean test accuracy over seeds (ρ is tuned per m on
      the test split), with mean ± std of test accuracy and of the generalization gap (train − test
      accuracy) over that ρ's seeds, and the seed count.
    - references: the same best-ρ row for sgd (no ρ), nsam and rwsam.
    - ghost_by_m: the best-ρ row per m of the ghost-BatchNorm control (method ghostbn).
    Cells are ranked on the score: test accuracy, or −test loss for a regression task (every run's
    test_acc is NaN); score_mean / score_std are its statistics (test_acc_mean stays NaN then).
    Only completed runs enter the statistics; diverged / failed runs are counted in `n_not_completed`.
    """
    st = open_store(store)
    members = st.list_runs(group=group_id, limit=100_000)
    if not members:
        raise ValueError(f"group_id: no runs in group {group_id!r}")
    runs = pd.DataFrame([_run_row(run) for run in members], columns=RUN_COLUMNS)
    runs = runs.sort_values(["method", "m", "rho", "seed"], na_position="first").reset_index(drop=True)
    batch_sizes = {run["params"].get("batch_size") for run in members}
    batch = batch_sizes.pop() if len(batch_sizes) == 1 else None
    sharp = runs[runs["method"].isin(["sam", "msam"])]
    heatmap = _cell_stats(sharp, ["m", "rho"])
    best = _best_rho(sharp, ["m"])
    refs = _best_rho(runs[runs["method"].isin(["sgd", "nsam", "rwsam"])], ["method"])
    ghost = _best_rho(runs[runs["method"] == "ghostbn"], ["m"])
    regression = bool(runs["test_acc"].isna().all() and runs["test_loss"].notna().any())
    return SweepTables(runs=runs, heatmap=heatmap, best_by_m=best, references=refs, batch_size=batch,
                       ghost_by_m=ghost, regression=regression)


def _run_row(run: dict[str, Any]) -> dict[str, Any]:
    cfg = run["params"]
    optim = cfg["optim"]
    method = optim["method"]
    summary = run.get("summary") or {}
    m = optim["m"] if method in ("msam", "ghostbn") else cfg["batch_size"] if method == "sam" else math.nan
    test_acc, test_loss = _num(summary.get("final_test_acc")), _num(summary.get("final_test_loss"))
    return {
        "run_id": run["id"],
        "status": run["status"],
        "method": method,
        "m": float(m),
        "rho": float(optim["rho"]) if method != "sgd" else math.nan,
        "lam": float(optim["lam"]) if method == "rwsam" else math.nan,
        "seed": cfg["seed"],
        "test_acc": _num(summary.get("final_test_acc")),
        "train_acc": _num(summary.get("final_train_acc")),
        "gap": _num(summary.get("generalization_gap")),
        "test_loss": _num(summary.get("final_test_loss")),
        "train_loss": _num(summary.get("final_train_loss")),
        "wall_time": _num(summary.get("wall_time")),
        "score": test_acc if not math.isnan(test_acc) else -test_loss,
    }


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


STAT_COLUMNS = ["test_acc_mean", "test_acc_std", "gap_mean", "gap_std", "n_seeds", "n_not_completed",
                "score_mean", "score_std", "test_loss_mean", "test_loss_std"]


def _cell_stats(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean / std (ddof 1) over the completed seeds of each cell; std is NaN with a single seed."""
    keys_all = keys if "rho" in keys else [*keys, "rho"]
    if runs.empty:
        return pd.DataFrame(columns=[*keys_all, *STAT_COLUMNS])
    rows = []
    for key, cell in runs.groupby(keys_all, dropna=False, sort=True):
        done = cell[cell["status"] == "completed"]
        rows.append(dict(zip(keys_all, key if isinstance(key, tuple) else (key,))) | {
            "test_acc_mean": done["test_acc"].mean(),
            "test_acc_std": done["test_acc"].std(ddof=1),
            "gap_mean": done["gap"].mean(),
            "gap_std": done["gap"].std(ddof=1),
            "n_seeds": int(len(done)),
            "n_not_completed": int(len(cell) - len(done)),
            "score_mean": done["score"].mean(),
            "score_std": done["score"].std(ddof=1),
            "test_loss_mean": done["test_loss"].mean(),
            "test_loss_std": done["test_loss"].std(ddof=1),
        })
    return pd.DataFrame(rows)


def _best_rho(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group of `keys`, the ρ cell with the highest mean score (ties: the smaller ρ)."""
    cells = _cell_stats(runs, keys)
    if cells.empty:
        return cells
    ranked = cells[cells["n_seeds"] > 0].sort_values([*keys, "score_mean", "rho"],
                                                     ascending=[True] * len(keys) + [False, True])
    best = ranked.groupby(keys, dropna=False, sort=True).head(1)
    best = best.assign(rhos_tried=best.apply(lambda row: _count_rhos(cells, keys, row), axis=1))
    return best.reset_index(drop=True)


def _count_rhos(cells: pd.DataFrame, keys: list[str], row: pd.Series) -> int:
    mask = pd.Series(True, index=cells.index)
    for key in keys:
        mask &= cells[key] == row[key]
    return int(mask.sum())


PAIRED_COLUMNS = ["method", "m", "rho", "reference_m", "reference_rho", "diff_mean", "diff_std", "n_pairs",
                  "n_better", "diff_se", "z"]


def paired_differences(tables: SweepTables) -> pd.DataFrame:
    """Per best-ρ cell (each m of `best_by_m`, then each reference method), the per-seed difference of
    final test accuracy against the largest m's best-ρ cell (same training seed, so the same
    initialisation and batch order): mean and std (ddof 1) over the seeds completed in both, the
    pair count and how many pairs favour the cell.

    Seeds share much of their run-to-run noise across cells (the same starting point and batch
    order), so the spread of the differences is usually smaller than the spread of either cell; the
    ρ of each cell is the one `best_by_m` / `references` picked on the mean score. The difference is
    in the score (test accuracy; −test loss for regression, so positive always favours the cell);
    diff_se = diff_std / sqrt(n_pairs) and z = diff_mean / diff_se (`samlab.paired`). The ghost-BatchNorm
    control cells (method ghostbn) follow the references.
    """
    best = tables.best_by_m.dropna(subset=["score_mean"])
    if best.empty:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    done = tables.runs[tables.runs["status"] == "completed"]
    reference = best.loc[best["m"].idxmax()]
    sharp = done[done["method"].isin(["sam", "msam"])]
    ref_acc = _score_by_seed(sharp[sharp["m"] == reference["m"]], reference["rho"])
    cells = [("msam", row["m"], row["rho"], sharp[sharp["m"] == row["m"]])
             for _, row in best.sort_values("m", ascending=False).iterrows()]
    cells += [(row["method"], math.nan, row["rho"], done[done["method"] == row["method"]])
              for _, row in tables.references.dropna(subset=["score_mean"]).iterrows()]
    if not tables.ghost_by_m.empty:
        cells += [("ghostbn", row["m"], row["rho"], done[(done["method"] == "ghostbn") & (done["m"] == row["m"])])
                  for _, row in tables.ghost_by_m.dropna(subset=["score_mean"]).iterrows()]
    rows = []
    for method, m, rho, runs in cells:
        p = paired_difference(_score_by_seed(runs, rho).to_dict(), ref_acc.to_dict())
        std = p.se * math.sqrt(p.n) if p.n > 1 else math.nan
        rows.append({"method": "sam" if m == tables.batch_size and method == "msam" else method, "m": m,
                     "rho": rho, "reference_m": reference["m"], "reference_rho": reference["rho"],
                     "diff_mean": p.mean, "diff_std": std, "n_pairs": p.n, "n_better": p.n_positive,
                     "diff_se": p.se, "z": p.z})
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def _score_by_seed(runs: pd.DataFrame, rho: float) -> pd.Series:
    cell = runs[runs["rho"].isna()] if pd.isna(rho) else runs[runs["rho"] == rho]
    return cell.set_index("seed")["score"]


