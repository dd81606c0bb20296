"""The run store as pandas DataFrames: runs with their config columns and summaries, and tidy curves.

    runs_table(store=None, *, kind="train", status=None, group=None, text=None, limit=1000, **columns)
        one row per run, newest first: the run's record (id, name, kind, status, group_id, times, device,
        host, progress, error), its params flattened to dotted columns (`optim.method`, `optim.rho`,
        `data.name`, `epochs`, ...) and its summary (`final_test_acc`, `best_test_acc`, `wall_time`, ...;
        accuracies as fractions, as the engine reports them); a name the record already has keeps a
        prefix (`params.name`, `params.device`, `summary.epochs`, `summary.device`). Any other keyword filters on a column,
        named in full or by its last dotted part (`method="msam"`, `rho=[0.05, 0.1]`).
    metrics(run_ids, names=None, *, kind=None, max_points=2000, store=None)
        long frame (run_id, kind, name, step, value): `Store.metrics`, each curve downsampled on the
        store to about `max_points` points (each bucket's first, last, min and max), as the dashboard draws it (None: every row).

    resolve_ids(run_ids, store=None) -> [full run id]

All read the store at `store` (a Store, a URL, or None for SAMLAB_STORE / the default SQLite file).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from samlab.runs.store import Run, Store, open_store

DASHBOARD_MAX_POINTS = 2000  # points per curve on the dashboard's Runs page
RECORD_COLUMNS = ("id", "name", "kind", "status", "group_id", "created_at", "started_at", "finished_at",
                  "device", "host", "progress", "error")


def runs_table(store: Store | str | None = None, *, kind: str | Iterable[str] | None = "train",
               status: str | Iterable[str] | None = None, group: str | None = None, text: str | None = None,
               limit: int = 1000, **columns: Any) -> pd.DataFrame:
    """Runs of the store as a DataFrame (see the module docstring); `kind=None` lists every kind."""
    runs = open_store(store).list_runs(status=status, kind=kind, group=group, text=text or None, limit=limit)
    frame = pd.DataFrame([_row(run) for run in runs])
    if frame.empty:  # no run to filter, nor columns to name
        return pd.DataFrame(columns=list(RECORD_COLUMNS))
    for name, wanted in columns.items():
        column = frame[_column(frame, name)]
        if isinstance(wanted, (list, tuple, set, frozenset)):
            frame = frame[column.isin(list(wanted))]
        else:
            frame = frame[column == wanted]
    return frame.reset_index(drop=True)


def metrics(run_ids: str | Iterable[str] | pd.DataFrame, names: str | Iterable[str] | None = None, *,
            kind: str | None = None, max_points: int | None = DASHBOARD_MAX_POINTS,
            store: Store | str | None = None) -> pd.DataFrame:
    """Tidy curves of runs (see the module docstring); `run_ids` may be one id, ids, or a `runs_table`."""
    st = open_store(store)
    wanted = [names] if isinstance(names, str) else names
    return st.metrics(resolve_ids(run_ids, st), names=wanted, kind=kind, max_points=max_points)


def resolve_ids(run_ids: str | Iterable[str] | pd.DataFrame, store: Store | str | None = None) -> list[str]:
    """Full run ids from one id, several, or a `runs_table` frame; a unique prefix works as on the
    command line (ValueError naming `run_id` otherwise)."""
    if isinstance(run_ids, pd.DataFrame):
        ids = run_ids["id"].tolist()
    else:
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    st = open_store(store)
    return [st.resolve_id(i) for i in ids]


def _row(run: Run) -> dict[str, Any]:
    row = {key: run.get(key) for key in RECORD_COLUMNS}
    # a name the record already has keeps a prefix: params "name", "device"; summary "status", "epochs"
    for prefix, values in (("params", flatten(run.get("params") or {})), ("summary", run.get("summary") or {})):
        for key, value in values.items():
            row[f"{prefix}.{key}" if key in row else key] = value
    return row


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"rho": 0.05}} → {"optim.rho": 0.05}; lists and other values are kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _column(frame: pd.DataFrame, name: str) -> str:
    """The column a filter keyword names: itself, or the one column whose last dotted part it is."""
    if name in frame.columns:
        return name
    matches = [c for c in frame.columns if c.rsplit(".", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"{name}: names several columns ({', '.join(matches)}); pass the full name "
                         f"as **{{{matches[0]!r}: ...}}")
    raise ValueError(f"{name}: no such column; the columns are {', '.join(map(str, frame.columns))}")
