"""Background runs: submit, cache, sweep, cancel, resume, wait, delete.

A submitted run is a row in the store with status `queued`; `ensure_scheduler()` (called by every
submit) makes sure a detached scheduler process (samlab.runs.scheduler) is there to start it on a free slot
as its own worker process (samlab.runs.worker). Nothing here blocks on a run, and the caller may exit at once.

Public API (every function takes `store`: a Store, a URL, or None for `default_url()`):
    submit(config_or_params, *, kind="train", name=None, group=None, store=None, start=True) -> run_id
        "train": a RunConfig or a dict, validated (`RunConfig.validate`); other kinds: params checked by
        `samlab.tasks.check_params`. Bad input raises ValueError with the message; nothing is queued.
    submit_cached(kind, params, *, name=None, store=None, start=True) -> run_id
        an existing queued/running/completed run with the same cache key, else a new one
    submit_sweep(configs, name, *, kind="train", store=None, start=True) -> group_id
        all validated first (ValueError "configs[i]: ..."), then queued in one transaction
    sweeps(store=None, *, kind="train") -> {group_id: sweep name}, newest first
    cancel(run_id, *, store=None, reason="cancelled") -> str "cancelled" (was queued) or "requested" (running: graceful stop,
                                         hard kill after SAMLAB_CANCEL_TIMEOUT_S by the scheduler)
    resume(run_id, *, store=None) -> run_id    cancelled/failed -> queued with resume=True
    new_group_id(name) -> str; member_specs(configs, name, group_id, *, kind, **extra) -> store specs
    start_runs(store, run_ids, *, group=None, resubmit=False)
        hand queued runs to the backend that SAMLAB_EXECUTOR selects: "local" (default) starts the
        detached scheduler, "ray" submits one Ray job for them (samlab.runs.ray_executor)
    ensure_scheduler(store=None) -> bool True when a scheduler was started (False: one is running)
    wait(run_ids, *, store=None, timeout=None, poll_s=0.5) -> {run_id: status}
    delete(run_id, *, store=None, files=True)  rows, and the run folder when it is marked as this run's

Runs whose worker is gone are marked failed by `samlab.runs.scheduler.reconcile`, which the scheduler
calls every few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from samlab import tasks
from samlab.checkpoints import checkpoint_of
from samlab.config import RunConfig
from samlab.runs.executors import backend_name, hostname, spawn_module
from samlab.runs.scheduler import lock_path, release, try_lock
from samlab.runs.store import FINAL, Store, open_store
from samlab.runs.worker import RUN_MARKER, register_plugin_tasks

_spawned: list[subprocess.Popen] = []


# -- submit ------------------------------------------------------------------------------------------
def _normalise(kind: str, config_or_params: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """Validated, JSON-ready params of a run (ValueError naming the field on bad input)."""
    if not isinstance(kind, str):
        raise ValueError(f"kind: must be a task kind name (got {kind!r})")
    register_plugin_tasks()
    if kind == "train" and isinstance(config_or_params, RunConfig):
        return config_or_params.validate().to_dict()
    if kind == "train" and isinstance(config_or_params, dict):  # no engine import (torch) to validate
        return RunConfig.from_dict(config_or_params).validate().to_dict()
    if not isinstance(config_or_params, dict):
        raise ValueError(f"params: expected a dict{' or a RunConfig' if kind == 'train' else ''}, "
                         f"got {type(config_or_params).__name__}")
    try:
        params = tasks.check_params(kind, config_or_params)
    except ImportError as exc:
        raise ValueError(f"kind: {kind!r} is not available here ({exc})") from None
    json.dumps(params)  # refuse what the store could not hold, before anything is queued
    return params


def _label(kind: str, params: dict[str, Any]) -> str:
    """What distinguishes a run: its hyperparameters for training, its kind for an analysis."""
    return RunConfig.from_dict(params).label() if kind == "train" else kind


def _default_name(kind: str, params: dict[str, Any]) -> str:
    name = params.get("name") if kind == "train" else None
    return f"{name} {_label(kind, params)}" if name else _label(kind, params)


def submit(config_or_params: RunConfig | dict[str, Any], *, kind: str = "train", name: str | None = None,
           group: str | None = None, store: Store | str | None = None, start: bool = True) -> str:
    """Queue one run; returns its id. Validation errors raise ValueError and queue nothing."""
    params = _normalise(kind, config_or_params)
    st = open_store(store)
    (run_id,) = st.create_runs([{"kind": kind, "params": params, "group_id": group,
                                 "name": name or _default_name(kind, params),
                                 "cache_key": tasks.cache_key(kind, params)}])
    if start:
        start_runs(st, [run_id])
    return run_id


def submit_cached(kind: str, params: dict[str, Any], *, name: str | None = None,
                  store: Store | str | None = None, start: bool = True) -> str:
    """The id of a queued, running or completed run of the same kind and params, or of a new one."""
    normalised = _normalise(kind, params)
    st = open_store(store)
    existing = st.find_cached(tasks.cache_key(kind, normalised))
    if existing is not None:
        return existing["id"]
    return submit(normalised, kind=kind, name=name, store=st, start=start)


SWEEP_NAME_SEP = " · "  # a sweep member is named "<sweep name> · <its hyperparameters>"


def sweeps(store: Store | str | None = None, *, kind: str | None = "train") -> dict[str, str]:
    """{group_id: sweep name} of every sweep (of `kind`), newest first."""
    return {group: name.split(SWEEP_NAME_SEP)[0] for group, name in open_store(store).groups(kind)}


def submit_sweep(configs: Sequence[RunConfig | dict[str, Any]], name: str, *, kind: str = "train",
                 store: Store | str | None = None, start: bool = True) -> str:
    """Queue a group of runs (all validated before any is queued); returns the group id."""
    if not configs:
        raise ValueError("configs: a sweep needs at least one config")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name: a sweep needs a non-empty name")
    st = open_store(store)
    group_id = new_group_id(name)
    run_ids = st.create_runs(member_specs(configs, name, group_id, kind=kind))
    if start:
        start_runs(st, run_ids, group=group_id)
    return group_id


def new_group_id(name: str) -> str:
    """A fresh id for a group of runs (a sweep, a search)."""
    return "g" + hashlib.sha256(f"{name}{time.time_ns()}{os.getpid()}".encode()).hexdigest()[:11]


def member_specs(configs: Sequence[RunConfig | dict[str, Any]], name: str, group_id: str, *,
                 kind: str = "train", **extra: Any) -> list[dict[str, Any]]:
    """Store specs of a group's members, each validated ("configs[i]: ..." on bad input), named
    "<name> · <hyperparameters>"; `extra` (e.g. study, trial) is recorded on every member."""
    specs = []
    for i, config in enumerate(configs):
        try:
            params = _normalise(kind, config)
        except ValueError as exc:
            raise ValueError(f"configs[{i}]: {exc}") from None
        specs.append({"kind": kind, "params": params, "name": f"{name}{SWEEP_NAME_SEP}{_label(kind, params)}",
                      "cache_key": tasks.cache_key(kind, params), "group_id": group_id, **extra})
    return specs


def start_runs(store: Store | str | None, run_ids: Sequence[str], *, group: str | None = None,
               resubmit: bool = False) -> None:
    """Hand queued runs to the backend (SAMLAB_EXECUTOR): the local scheduler, or one Ray job for them."""
    st = open_store(store)
    if backend_name() == "ray":
        from samlab.runs import ray_executor

        ray_executor.submit(st, list(run_ids), group=group, resubmit=resubmit)
    else:
        ensure_scheduler(st)


# -- control -----------------------------------------------------------------------------------------
def cancel(run_id: str, *, store: Store | str | None = None, reason: str = "cancelled") -> str:
    """Cancel a queued run at once, or ask a running one to stop (checkpoint, then `cancelled`; with
    reason="pruned", a search's pruner, the run ends as `pruned`)."""
    st = open_store(store)
    run = st.get_run(run_id)
    outcome = st.request_cancel(run["id"], reason)
    if not outcome:
        raise ValueError(f"run_id: run {run['id']} is {st.get_run(run['id'])['status']}; "
                         "only queued or running runs can be cancelled")
    if run["executor"] == "ray":
        from samlab.runs import ray_executor

        ray_executor.after_cancel(st, run)  # the task reads the flag; the job stops once none is left
    elif outcome == "requested":
        ensure_scheduler(st)  # the scheduler enforces the hard kill after the grace period
    return outcome


def resume(run_id: str, *, store: Store | str | None = None, start: bool = True) -> str:
    """Queue a cancelled or failed run again, to continue from its checkpoint / saved state.

    A train run whose checkpoint is visible from here and missing is refused with the reason
    recorded on the run; a corrupt one fails the resumed run in its worker, with the reason."""
    st = open_store(store)
    run = st.get_run(run_id)
    if run["status"] not in ("cancelled", "failed"):
        raise ValueError(f"run_id: run {run['id']} is {run['status']}; only cancelled or failed runs resume")
    if run["kind"] == "train" and run["host"] in (None, hostname()) and run["workdir"]:
        checkpoint = Path(checkpoint_of(run))
        if not checkpoint.is_file():
            reason = (f"resume: no checkpoint at {checkpoint}; the run stopped before its first checkpoint, "
                      "submit it again instead")
            st.record_error(run["id"], reason)
            raise ValueError(reason)
    if not st.requeue(run["id"], resume=True):
        raise ValueError(f"run_id: run {run['id']} changed status meanwhile; try again")
    if start:
        start_runs(st, [run["id"]], resubmit=True)
    return run["id"]


def ensure_scheduler(store: Store | str | None = None) -> bool:
    """Start a detached scheduler for this store on this host unless one is running."""
    st = open_store(store)
    for proc in list(_spawned):  # collect schedulers of ours that have exited (no zombies in a long UI)
        if proc.poll() is not None:
            _spawned.remove(proc)
    fd = try_lock(lock_path(st))
    if fd is None:
        return False
    release(fd)
    _spawned.append(spawn_module("samlab.runs.scheduler", ["--store", st.url], st.runs_root / "scheduler.log"))
    return True


def wait(run_ids: str | Iterable[str], *, store: Store | str | None = None, timeout: float | None = None,
         poll_s: float = 0.5) -> dict[str, str]:
    """Block until every run reaches a final status (or `timeout` seconds pass); returns the statuses."""
    st = open_store(store)
    ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        statuses = {run_id: st.get_run(run_id)["status"] for run_id in ids}
        if all(s in FINAL for s in statuses.values()):
            return statuses
        if deadline is not None and time.monotonic() > deadline:
            return statuses
        time.sleep(poll_s)


def delete(run_id: str, *, store: Store | str | None = None, files: bool = True) -> None:
    """Delete a run's rows and (if `files`) its run folder, when the folder is marked as this run's."""
    st = open_store(store)
    run = st.delete_run(run_id)
    workdir = Path(run["workdir"]) if run["workdir"] else None
    if files and workdir is not None and workdir.is_dir():
        marker = workdir / RUN_MARKER
        if marker.is_file() and marker.read_text().strip() == run["id"]:
            shutil.rmtree(workdir, ignore_errors=True)
