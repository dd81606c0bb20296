"""Pure pandas helpers behind the dashboard's tables and legends: no streamlit, unit-tested.

- `used_hyperparameters(config)`: the flat {dotted key: value} a run's choices actually use.
- `distinguishing_labels(configs)`: short labels (≤ 60 characters) from the hyperparameters that differ
  between runs, plus a short id; `config_text(config)` the full config they stand for.
- `summary_table(runs)`: one row per run with final / best test accuracy, gap, wall time, device and
  the hyperparameters.
- `metrics_csv(frames)`: the selected runs' metrics as one long CSV.
- `run_config(run)`, `run_labels(runs)`: a stored run's config, legend names of stored runs.
- `eta_seconds`, `format_duration`: the progress line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from dashboard.forms import config_values, visible_fields
from samlab.config import RunConfig
from samlab.data import DATASET_INFO

# Fields that say how a run is logged, stored or computed, not what it computes (mSAM's vmap and loop
# give the same numbers): never a legend entry.
BOOKKEEPING_FIELDS = {
    "name", "data.root", "eval_every", "log_every", "checkpoint_every", "hessian_every",
    "hessian_samples", "noise_every", "device", "precision", "optim.impl",
}
# Short legend names; a missing key shows its last dotted part.
SHORT_NAMES: dict[str, str] = {
    "optim.method": "",
    "data.name": "",
    "model.name": "",
    "optim.rho": "ρ",
    "optim.m": "m",
    "optim.lam": "λ",
    "optim.lr": "lr",
    "optim.base": "base",
    "optim.weight_decay": "wd",
    "optim.momentum": "mom",
    "optim.adaptive_eta": "η_a",
    "optim.nsam_batch": "n-SAM batch",
    "data.label_noise": "noise",
    "data.n_train": "n",
    "data.data_seed": "data seed",
    "batch_size": "b",
    "model.width": "width",
    "schedule.name": "sched",
    "seed": "seed",
}
# Order in which differing fields appear in a label: the science first.
LABEL_ORDER = ("optim.method", "optim.rho", "optim.m", "optim.lam", "data.name", "model.name",
               "data.label_noise", "data.n_train", "optim.lr", "batch_size", "epochs")

# Hyperparameter columns of the summary table and the parallel-coordinates plot.
HYPERPARAMETER_COLUMNS: dict[str, str] = {
    "optim.method": "method",
    "data.name": "dataset",
    "model.name": "model",
    "optim.rho": "rho",
    "optim.m": "m",
    "optim.lam": "lam",
    "optim.lr": "lr",
    "batch_size": "batch_size",
    "epochs": "epochs",
    "data.n_train": "n_train",
    "data.label_noise": "label_noise",
    "optim.weight_decay": "weight_decay",
    "optim.momentum": "momentum",
    "model.width": "width",
    "seed": "seed",
}


def used_hyperparameters(config: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The flat hyperparameters this run's choices use (e.g. no ρ for sgd, no m but for msam)."""
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(dict(config))
    values = config_values(cfg)
    values["seed"] = cfg.seed
    used = {f.key for f in visible_fields(values)} | {"seed"}
    return {k: v for k, v in values.items() if k in used}


LABEL_CHARS = 60  # a label fits a legend entry, a picker option and a table cell
ID_CHARS = 6  # the short id every label ends with


def distinguishing_labels(configs: Mapping[Any, RunConfig | Mapping[str, Any]],
                          names: Mapping[Any, str] | None = None, *, max_chars: int = LABEL_CHARS) -> dict[Any, str]:
    """A label per run: the hyperparameters that differ among the given runs, the science first, then
    the run's short id ('msam ρ=0.1 m=8 seed=1 · 67f621'), at most `max_chars` characters.

    Differing values that do not fit are left out and marked '…' (the full config is `config_text`).
    A single run, or runs that agree on everything, is named by its name, else by its method.
    """
    parts = _differing_parts({rid: used_hyperparameters(cfg) for rid, cfg in configs.items()}, names)
    return {rid: fit_label(p, max_chars - len(f" · {str(rid)[:ID_CHARS]}")) + f" · {str(rid)[:ID_CHARS]}"
            for rid, p in parts.items()}


def seed_groups(configs: Mapping[Any, RunConfig | Mapping[str, Any]], *,
                max_chars: int = LABEL_CHARS) -> dict[str, list[Any]]:
    """Runs that differ only in their seed, grouped: {label: run ids}, in first-seen order. A label is
    the hyperparameters that differ between the groups and the group's seed count ('sam ρ=0.1 · 3 seeds')."""
    members: dict[tuple, list[Any]] = {}
    flats: dict[tuple, dict[str, Any]] = {}
    for rid, cfg in configs.items():
        flat = {k: v for k, v in used_hyperparameters(cfg).items() if k != "seed" and k not in BOOKKEEPING_FIELDS}
        key = tuple(sorted((k, repr(v)) for k, v in flat.items()))
        members.setdefault(key, []).append(rid)
        flats.setdefault(key, flat)
    parts = _differing_parts(flats, None)
    labels = {}
    for key, ids in members.items():
        suffix = f" · {len(ids)} seed{'s' if len(ids) != 1 else ''}"
        labels[fit_label(parts[key], max_chars - len(suffix)) + suffix] = ids
    return labels


def _differing_parts(flats: Mapping[Any, Mapping[str, Any]], names: Mapping[Any, str] | None) -> dict[Any, list[str]]:
    """Per run, the 'key=value' parts of the hyperparameters that differ among all of them (the science
    first); its name, else its method, when nothing differs."""
    keys = sorted({k for flat in flats.values() for k in flat} - BOOKKEEPING_FIELDS, key=_label_rank)
    differing = [k for k in keys if len({_hashable(flat.get(k)) for flat in flats.values()}) > 1]
    out: dict[Any, list[str]] = {}
    for rid, flat in flats.items():
        if differing:
            out[rid] = [p for p in (_label_part(k, flat[k]) for k in differing if k in flat) if p]
        else:
            out[rid] = [(names or {}).get(rid) or _label_part("optim.method", flat["optim.method"])]
    return out


def config_text(config: RunConfig | Mapping[str, Any]) -> str:
    """Every hyperparameter a run uses, in label order: the full config a short label stands for."""
    flat = used_hyperparameters(config)
    keys = sorted(set(flat) - BOOKKEEPING_FIELDS, key=_label_rank)
    return " ".join(p for p in (_label_part(k, flat[k]) for k in keys) if p)


def fit_label(parts: Sequence[str], budget: int) -> str:
    """Join parts with spaces; when they do not fit the budget, keep the first ones that do and mark
    the rest '…' (a single part too long for the budget, e.g. a name, is cut)."""
    full = " ".join(parts)
    if len(full) <= budget:
        return full
    kept: list[str] = []
    for part in parts:
        if len(" ".join([*kept, part, "…"])) > budget:
            break
        kept.append(part)
    if not kept:
        return parts[0][: max(budget - 1, 1)] + "…"
    return " ".join([*kept, "…"])


def run_config(run: Mapping[str, Any]) -> RunConfig | None:
    """A train run's RunConfig from its params; None for another kind or unparsable params."""
    if run.get("kind", "train") != "train":
        return None
    try:
        return RunConfig.from_dict(run["params"])
    except (ValueError, TypeError, KeyError):
        return None


def run_labels(runs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The one label of a run in every picker, legend and table: the hyperparameters that differ among
    these runs plus a short id, ≤ 60 characters (`distinguishing_labels`); a run of another kind (an
    analysis) is its name and short id."""
    configs = {r["id"]: cfg for r in runs if (cfg := run_config(r)) is not None}
    labels = distinguishing_labels(configs, {r["id"]: r.get("name") or "" for r in runs})
    return {r["id"]: labels.get(r["id"]) or _other_label(r) for r in runs}


def run_details(runs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The full config of each run (every hyperparameter it uses): the hover text behind its short label."""
    return {r["id"]: config_text(cfg) if (cfg := run_config(r)) is not None else (r.get("name") or r["id"])
            for r in runs}


def _other_label(run: Mapping[str, Any]) -> str:
    suffix = f" · {run['id'][:ID_CHARS]}"
    return fit_label([run.get("name") or run.get("kind") or ""], LABEL_CHARS - len(suffix)) + suffix


def summary_row(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """Scores of one run from the engine's summary (accuracies in %, gaps in points / loss units)."""
    summary = summary or {}
    return {
        "final_test_acc": _percent(summary.get("final_test_acc")),
        "best_test_acc": _percent(summary.get("best_test_acc")),
        "final_train_acc": _percent(summary.get("final_train_acc")),
        "gap_acc": _percent(summary.get("generalization_gap")),
        "final_test_loss": _number(summary.get("final_test_loss")),
        "gap_loss": _number(summary.get("loss_gap")),
        "wall_time": _number(summary.get("wall_time")),
    }


def summary_table(runs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run: id, name, status, group, study and trial (a search's run), scores, device, host
    and hyperparameter columns.

    Each run is a mapping with `id`, `config` (RunConfig or dict) and optionally `name`, `status`,
    `group`, `study`, `trial`, `device`, `summary` (the engine's summary dict), `created`.
    """
    rows = []
    for run in runs:
        cfg = run["config"]
        hyper = used_hyperparameters(cfg)
        row = {"id": run["id"], "name": run.get("name") or "", "status": run.get("status", ""),
               "group": run.get("group") or "", "study": run.get("study") or "", "trial": run.get("trial")}
        row.update(summary_row(run.get("summary")))
        row["device"] = run.get("device") or (run.get("summary") or {}).get("device") or ""
        row["host"] = run.get("host") or ""  # where the run ran: this machine or a cluster node
        for key, column in HYPERPARAMETER_COLUMNS.items():
            row[column] = hyper.get(key)
        rows.append(row)
    columns = ["id", "name", "status", "group", "study", "trial", *summary_row(None), "device", "host",
               *HYPERPARAMETER_COLUMNS.values()]
    return pd.DataFrame(rows, columns=columns)


def metrics_csv(frames: Mapping[str, pd.DataFrame]) -> str:
    """The metrics of several runs as one long CSV: run, kind, step, time, metric, value.

    `frames` maps a run label to a long frame with columns kind, step, time, metric, value.
    """
    parts = []
    for label, frame in frames.items():
        if frame.empty:
            continue
        part = frame.copy()
        part.insert(0, "run", label)
        parts.append(part)
    if not parts:
        return "run,kind,step,time,metric,value\n"
    return pd.concat(parts, ignore_index=True).to_csv(index=False)


def eta_seconds(done: float, total: float, elapsed: float) -> float | None:
    """Remaining time at the average rate so far; None before any progress or after the end."""
    if total <= 0 or done <= 0 or elapsed < 0 or done >= total:
        return None
    return elapsed * (total - done) / done


def format_duration(seconds: float | None) -> str:
    """'—', '42 s', '3 min 05 s', '2 h 07 min'."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, secs = divmod(int(round(seconds)), 60)
        return f"{minutes} min {secs:02d} s"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min"


# -- helpers ----------------------------------------------------------------------------------------
def _label_rank(key: str) -> tuple[int, str]:
    return (LABEL_ORDER.index(key) if key in LABEL_ORDER else len(LABEL_ORDER), key)


def _label_part(key: str, value: Any) -> str:
    short = SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])
    text = "all" if value is None and key in ("data.n_train", "data.n_test") else _format_value(value)
    return text if short == "" else f"{short}={text}"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _percent(value: Any) -> float | None:
    number = _number(value)
    return None if number is None else 100.0 * number


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


# -- curves -------------------------------------------------------------------------------------------
METRIC_KINDS = ("step", "epoch")


def data_task(config: RunConfig) -> str:
    """'classification' or 'regression': what the run's dataset asks for (it sets the loss unit)."""
    return DATASET_INFO[config.data.name]["task"]


def steps_per_epoch(config: RunConfig) -> int:
    """Optimizer steps per epoch as the engine counts them: full batches only (drop_last), with the
    batch capped at the train-set size."""
    available = DATASET_INFO[config.data.name]["n_train"]
    n = config.data.n_train if config.data.n_train is not None else available
    batch = min(config.batch_size, n)
    return max(1, n // batch)


def metric_key(kind: str, name: str) -> str:
    """'epoch.test_acc': a metric choice that names its kind (the same name can be logged per step
    and per epoch evaluation)."""
    return f"{kind}.{name}"


def split_metric_key(key: str) -> tuple[str, str]:
    kind, sep, name = key.partition(".")
    if not sep or kind not in METRIC_KINDS or not name:
        raise ValueError(f"metric: expected 'step.<name>' or 'epoch.<name>' (got {key!r})")
    return kind, name


def metric_choice_label(key: str) -> str:
    """'epoch.test_acc' → 'test_acc (per epoch evaluation)'."""
    kind, name = split_metric_key(key)
    return f"{name} ({'per epoch evaluation' if kind == 'epoch' else 'per optimizer step'})"


def metric_choices(names: Sequence[tuple[str, str]]) -> list[str]:
    """Metric keys for the (kind, name) pairs a set of runs has, evaluation metrics first."""
    order = {"epoch": 0, "step": 1}
    return [metric_key(k, n) for k, n in sorted(names, key=lambda kn: (order.get(kn[0], 2), kn[1]))]


def curve_xy(metrics: pd.DataFrame, run_id: str, key: str, x: str, *, spe: int,
             times: pd.DataFrame | None = None) -> tuple[Any, Any]:
    """One run's curve of `key` against x = step | epoch | time.

    `metrics` is the store's long frame (run_id, kind, name, step, value): step rows count optimizer
    steps, epoch rows count epochs. x = "epoch" divides steps by `spe` (steps per epoch); x = "step"
    multiplies epochs by it; x = "time" uses `times` (run_id, kind, step, time: seconds since the run's
    first record), interpolated between logged steps.
    """
    kind, name = split_metric_key(key)
    rows = metrics[(metrics["run_id"] == run_id) & (metrics["kind"] == kind) & (metrics["name"] == name)]
    rows = rows.sort_values("step")
    steps = rows["step"].to_numpy(dtype=float)
    values = rows["value"].to_numpy(dtype=float)
    if x == "time":
        if times is None or times.empty:
            return steps[:0], values[:0]
        known = times[(times["run_id"] == run_id) & (times["kind"] == kind)].sort_values("step")
        if known.empty:
            return steps[:0], values[:0]
        # downsampled curves have fractional (bucket-mean) steps: interpolate their times
        t = np.interp(steps, known["step"].to_numpy(dtype=float), known["time"].to_numpy(dtype=float))
        return t, values
    if x == "epoch":
        return (steps / spe if kind == "step" else steps), values
    if x == "step":
        return (steps * spe if kind == "epoch" else steps), values
    raise ValueError(f"x: must be one of step, epoch, time (got {x!r})")


def wide_metrics(metrics: pd.DataFrame, run_id: str, kind: str, *, spe: int) -> pd.DataFrame:
    """One run's metrics of one kind as columns (step, epoch, <metric>...), for the run panel."""
    rows = metrics[(metrics["run_id"] == run_id) & (metrics["kind"] == kind)]
    if rows.empty:
        return pd.DataFrame(columns=["step", "epoch"])
    wide = rows.pivot_table(index="step", columns="name", values="value", aggfunc="last").reset_index()
    wide.columns.name = None
    if kind == "epoch":
        wide["epoch"] = wide["step"]
        wide["step"] = wide["step"] * spe
    else:
        wide["epoch"] = wide["step"] / spe
    return wide
