"""Adaptive search: ρ (and optionally lr, weight decay) tuned per m by a sampler instead of a grid.

A search (`SearchSpec`) holds one Optuna study per m (samlab.runs.search drives them); each trial is
one ordinary "train" run per seed of the same group, recorded with its study and trial number. This
module is the search's math and bookkeeping: the spec, the member configs of a trial, and the trial
history read back from the run store (objective = mean final test accuracy over the trial's seeds),
with the best trial so far per m. The grid sweeps' tables (`samlab.sweeps.aggregate`) apply to a
search's group as they are: every trial is its own ρ cell.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from samlab.config import RunConfig
from samlab.runs.store import ACTIVE, Store, open_store
from samlab.validation import check_int

RANGE_NAMES = {"rho": "optim.rho", "lr": "optim.lr", "weight_decay": "optim.weight_decay"}


def parse_range(name: str, text: str | None) -> tuple[float, float] | None:
    """"a:b" as a (low, high) pair with 0 < low < high (searched log-uniformly); None for empty text."""
    if text is None or not str(text).strip():
        return None
    lo_text, sep, hi_text = str(text).partition(":")
    try:
        lo, hi = float(lo_text), float(hi_text)
    except ValueError:
        lo = hi = math.nan
    if not sep or not (0 < lo < hi < math.inf):
        raise ValueError(f"{name}: a log-uniform range LOW:HIGH with 0 < LOW < HIGH (got {text!r})")
    return lo, hi


def _check_range(name: str, value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not 0 < value[0] < value[1] < math.inf):
        raise ValueError(f"{name}: a log-uniform range (low, high) with 0 < low < high (got {value!r})")
    return float(value[0]), float(value[1])


@dataclass
class SearchSpec:
    """One study per m in `ms` (m = the batch size is plain SAM), `trials` trials each.

    A trial samples ρ log-uniformly in `rho` (and lr, weight decay in `lr`, `weight_decay` when given)
    and trains one run per seed; its objective is the mean final test accuracy over those seeds (test
    split: there is no separate validation split, as in the grid sweeps). At most `parallel` trials
    are in flight over all studies. The TPE sampler of the i-th m is seeded with `sampler_seed + i`;
    its first `random_trials` trials per study are random. A median pruner stops a trial whose mean
    test accuracy at an epoch is below the median of earlier trials at that epoch, once
    `prune_startup` trials of its study finished and after `prune_warmup` epochs.
    """

    base: RunConfig
    ms: list[int]
    rho: tuple[float, float]
    trials: int
    seeds: list[int]
    lr: tuple[float, float] | None = None
    weight_decay: tuple[float, float] | None = None
    parallel: int = 2
    name: str = "search"
    sampler_seed: int = 0
    random_trials: int = 5
    prune: bool = True
    prune_startup: int = 3
    prune_warmup: int = 2
    kind: str = "train"  # the task kind of the trial runs (another kind takes the same config dict)
    runner: str = "sweep"  # "sweep": sweep workers run the trials; "scheduler": jobs.start_runs
    workers: int | None = None  # sweep workers (default: parallel × seeds, at most the cores)

    def ranges(self) -> dict[str, tuple[float, float]]:
        """The searched ranges by name (rho, and lr / weight_decay when given)."""
        given = {"rho": self.rho, "lr": self.lr, "weight_decay": self.weight_decay}
        return {k: _check_range(k, v) for k, v in given.items() if v is not None}

    def validate(self) -> SearchSpec:
        self.base.validate()
        b = self.base.batch_size
        if not self.ms or len(set(self.ms)) != len(self.ms):
            raise ValueError(f"ms: a non-empty list of distinct micro-batch sizes (got {self.ms!r})")
        for m in self.ms:
            if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= b or b % m:
                raise ValueError(f"ms: every m must divide batch_size={b} (got {m!r})")
        if self.rho is None:
            raise ValueError("rho: a search needs a ρ range")
        self.ranges()
        check_int("trials", self.trials, 1, 10_000)
        check_int("parallel", self.parallel, 1, 1024)
        check_int("random_trials", self.random_trials, 1, 10_000)
        check_int("prune_startup", self.prune_startup, 0, 10_000)
        check_int("prune_warmup", self.prune_warmup, 0, 100_000)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds: a non-empty list of distinct integer seeds (got {self.seeds!r})")
        if self.runner not in ("sweep", "scheduler"):
            raise ValueError(f"runner: must be 'sweep' or 'scheduler' (got {self.runner!r})")
        if self.workers is not None:
            check_int("workers", self.workers, 1, 1024)
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("name: a search needs a non-empty name")
        return self

    def study_name(self, search_id: str, m: int) -> str:
        return f"{search_id}-m{m}"

    def trial_configs(self, m: int, values: dict[str, float]) -> list[RunConfig]:
        """The runs of one trial at micro-batch size m with the sampled `values` (rho, lr, weight_decay)."""
        method = {"optim.method": "sam", "optim.m": None} if m == self.base.batch_size else \
            {"optim.method": "msam", "optim.m": m}
        sampled = {RANGE_NAMES[k]: float(v) for k, v in values.items()}
        return [self.base.with_overrides(method | sampled | {"seed": seed, "name": self.name}).validate()
                for seed in self.seeds]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["base"] = self.base.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SearchSpec:
        raw = dict(raw)
        raw["base"] = RunConfig.from_dict(raw["base"])
        for key in ("rho", "lr", "weight_decay"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        return cls(**raw).validate()


# -- trial history ----------------------------------------------------------------------------------
TRIAL_COLUMNS = ["m", "trial", "rho", "lr", "weight_decay", "status", "objective", "n_runs", "n_completed",
                 "best_so_far", "is_best"]


def trial_history(store: Store | str | None, search_id: str) -> pd.DataFrame:
    """One row per trial of the search, in trial order per m: the sampled values, the trial's status
    (running while any run is active, pruned when any run was pruned, completed when every run
    completed, else the status of its first unfinished run), its objective (mean final test accuracy
    over seeds, completed trials only), and the best objective so far in its study."""
    runs = open_store(store).list_runs(group=search_id, limit=100_000)
    rows = [_trial_row(trial_runs) for trial_runs in _by_trial(runs).values()]
    table = pd.DataFrame(rows, columns=TRIAL_COLUMNS[:-2])
    if table.empty:
        return pd.DataFrame(columns=TRIAL_COLUMNS)
    table = table.sort_values(["m", "trial"], ascending=[False, True]).reset_index(drop=True)
    table["best_so_far"] = table.groupby("m")["objective"].cummax()
    best = table.groupby("m")["objective"].transform("max")
    table["is_best"] = table["objective"].notna() & (table["objective"] == best)
    return table


def _by_trial(runs: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        if run.get("study") is not None and run.get("trial") is not None:
            out.setdefault((run["study"], run["trial"]), []).append(run)
    return out


def _trial_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    params = runs[0]["params"]
    optim = params["optim"]
    m = optim["m"] if optim["method"] == "msam" else params["batch_size"]
    statuses = [r["status"] for r in runs]
    accs = [(r.get("summary") or {}).get("final_test_acc") for r in runs]
    objective = trial_objective(statuses, accs)
    return {"m": int(m), "trial": int(runs[0]["trial"]), "rho": float(optim["rho"]), "lr": float(optim["lr"]),
            "weight_decay": float(optim["weight_decay"]), "status": trial_status(statuses),
            "objective": math.nan if objective is None else objective, "n_runs": len(runs),
            "n_completed": statuses.count("completed")}


def trial_status(statuses: list[str]) -> str:
    """A trial's status from its runs' statuses."""
    if any(s in ACTIVE for s in statuses):
        return "running"
    if "pruned" in statuses:
        return "pruned"
    unfinished = [s for s in statuses if s != "completed"]
    return unfinished[0] if unfinished else "completed"


def trial_objective(statuses: list[str], accuracies: list[Any]) -> float | None:
    """Mean final test accuracy over a trial's runs when every run completed (else None)."""
    if not statuses or any(s != "completed" for s in statuses):
        return None
    values = [float(a) for a in accuracies if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(values) != len(statuses) or any(v != v for v in values):
        return None
    return sum(values) / len(values)


def epoch_means(metrics: pd.DataFrame, run_ids: list[str]) -> dict[int, float]:
    """Per epoch, the mean test accuracy over a trial's runs, for the epochs every run has reached
    (a run's NaN evaluation is skipped; an epoch where all are NaN is left out)."""
    if metrics.empty or not run_ids:
        return {}
    rows = metrics[metrics["run_id"].isin(run_ids)]
    wide = rows.pivot_table(index="step", columns="run_id", values="value", aggfunc="last", dropna=False)
    if set(wide.columns) != set(run_ids):
        return {}
    reached = wide.index[wide.index <= min(rows.groupby("run_id")["step"].max())]
    means = wide.loc[reached].mean(axis=1, skipna=True)
    return {int(step): float(v) for step, v in means.items() if v == v}


def best_by_m(history: pd.DataFrame) -> pd.DataFrame:
    """Per m, the best trial so far (its ρ and objective) and the trials finished / in flight."""
    cols = ["m", "best_rho", "best_objective", "best_trial", "finished", "pruned", "running"]
    if history.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for m, group in history.groupby("m", sort=False):
        done = group.dropna(subset=["objective"])
        top = done.loc[done["objective"].idxmax()] if not done.empty else None
        rows.append({"m": m, "best_rho": top["rho"] if top is not None else math.nan,
                     "best_objective": top["objective"] if top is not None else math.nan,
                     "best_trial": int(top["trial"]) if top is not None else None,
                     "finished": int((group["status"] != "running").sum()),
                     "pruned": int((group["status"] == "pruned").sum()),
                     "running": int((group["status"] == "running").sum())})
    return pd.DataFrame(rows, columns=cols)


def last_epoch_means(store: Store | str | None, search_id: str) -> dict[tuple[int, int], float]:
    """Per (m, trial) of the search, its mean test accuracy at the last epoch all of its runs reached
    (what the pruner saw last)."""
    st = open_store(store)
    runs = st.list_runs(group=search_id, limit=100_000)
    groups = _by_trial(runs)
    metrics = st.metrics([r["id"] for r in runs], names=["test_acc"], kind="epoch") if runs else None
    out: dict[tuple[int, int], float] = {}
    for trial_runs in groups.values():
        means = epoch_means(metrics, [r["id"] for r in trial_runs]) if metrics is not None else {}
        if means:
            row = _trial_row(trial_runs)
            out[(row["m"], row["trial"])] = means[max(means)]
    return out
