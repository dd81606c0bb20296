"""The Ray backend: runs and sweeps as Ray jobs on an existing cluster, metrics in the shared store.

Chosen by SAMLAB_EXECUTOR=ray with SAMLAB_RAY_ADDRESS, the http address of the cluster's dashboard
(e.g. http://head:8265). The submitting process (the dashboard, the CLI) never becomes a Ray driver:
it talks to the cluster only through Ray's Jobs API (`ray.job_submission.JobSubmissionClient`, plain
HTTP). One job per sweep, or per single run:

1. the submission id, derived from the sweep id (`samlab-<group>`) or the run id, is recorded on the
   runs in the store (`executor="ray"`, `executor_ref=<id>`) — before anything is submitted;
2. the job is submitted with that id; its entry point `python -m samlab.runs.ray_job --store URL --group ID`
   (or `--run ID ...`) fans out one Ray task per run (samlab.runs.ray_job), which writes to the store.

Cancel: a run's cancel flag in the store (the task reads it, checkpoints and ends); once no run of
a job is left without a stop request the job itself is stopped. Reconcile (after a restart of the UI,
or any time): a job the store names but the cluster does not know (the submitter died between steps
1 and 2) is submitted now; a job that ended while some of its runs are still queued or running marks
them failed (cancelled when a stop was requested) with the job's status and message.

The store URL travels in the job's entry point; keep passwords out of it (libpq reads PGPASSWORD or
~/.pgpass on the cluster nodes). Run folders (logs, checkpoints) are the paths recorded in the store:
on a multi-node cluster, point SAMLAB_RUNS_DIR at a filesystem every node and the UI share.

Public API: EXECUTOR, address(), submission_id(key, resubmit), submit(store, run_ids, group=None),
job_status(ref), stop(ref), after_cancel(store, run), reconcile(store), describe(), entrypoint(...).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import urllib.request
from collections.abc import Sequence
from typing import Any

from samlab.runs.store import ACTIVE, Store, new_id

EXECUTOR = "ray"
FORWARDED_ENV = ("SAMLAB_TASKS", "SAMLAB_FLUSH_S", "SAMLAB_RUNS_DIR", "SAMLAB_CANCEL_TIMEOUT_S",
                 "PGPASSWORD")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
HTTP_TIMEOUT_S = 5.0


def address() -> str:
    """SAMLAB_RAY_ADDRESS: the http(s) address of the Ray cluster's dashboard (Jobs API)."""
    value = (os.environ.get("SAMLAB_RAY_ADDRESS") or "").strip().rstrip("/")
    if not value:
        raise ValueError("SAMLAB_RAY_ADDRESS: set it to the Ray dashboard address, e.g. http://127.0.0.1:8265, "
                         "to run with SAMLAB_EXECUTOR=ray")
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"SAMLAB_RAY_ADDRESS: must be an http:// or https:// address (got {value!r})")
    return value


_CLIENTS: dict[str, Any] = {}


def _client():
    """A Jobs API client for the cluster (HTTP only: this process does not join the cluster)."""
    from ray.job_submission import JobSubmissionClient

    url = address()
    if url not in _CLIENTS:
        _CLIENTS[url] = JobSubmissionClient(url)
    return _CLIENTS[url]


def submission_id(key: str, resubmit: bool = False) -> str:
    """`samlab-<sweep or run id>`; a later job for the same runs (resume) gets a random suffix."""
    return f"samlab-{key}" + (f"-{new_id()[:6]}" if resubmit else "")


def entrypoint(store_url: str, *, group: str | None = None, run_ids: Sequence[str] = ()) -> str:
    """The job's shell command: this Python (or SAMLAB_RAY_PYTHON) running samlab.runs.ray_job."""
    python = os.environ.get("SAMLAB_RAY_PYTHON") or sys.executable
    args = [python, "-m", "samlab.runs.ray_job", "--store", store_url]
    args += ["--group", group] if group else [item for run_id in run_ids for item in ("--run", run_id)]
    return shlex.join(args)


def _runtime_env() -> dict[str, Any]:
    env = {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}
    return {"env_vars": env}


def submit(store: Store, run_ids: Sequence[str], *, group: str | None = None, resubmit: bool = False) -> str:
    """Record the submission id on the queued runs, then submit their job; returns the id.

    A cluster that cannot be reached fails the runs with the reason and raises ValueError."""
    if not run_ids:
        raise ValueError("run_ids: a Ray job needs at least one run")
    ref = submission_id(group or run_ids[0], resubmit)
    store.assign_executor(run_ids, EXECUTOR, ref)
    _submit_recorded(store, ref, group=group, run_ids=run_ids)
    return ref


def _submit_recorded(store: Store, ref: str, *, group: str | None, run_ids: Sequence[str]) -> None:
    try:
        _client().submit_job(entrypoint=entrypoint(store.url, group=group, run_ids=[] if group else run_ids),
                             submission_id=ref, runtime_env=_runtime_env(),
                             metadata={"samlab_group": group or "", "samlab_runs": str(len(run_ids))})
    except Exception as exc:  # unreachable cluster, refused submission: visible on the runs
        reason = f"could not submit Ray job {ref} to {address()}: {type(exc).__name__}: {exc}"
        for run_id in run_ids:
            store.fail_run(run_id, reason, only_if_active=True)
        raise ValueError(f"SAMLAB_RAY_ADDRESS: {reason}") from None


def job_status(ref: str) -> tuple[str, str] | None:
    """(status, message) of a job, or None when the cluster has no job with that id."""
    try:
        info = _client().get_job_info(ref)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            return None
        raise
    return str(info.status.value if hasattr(info.status, "value") else info.status), info.message or ""


def stop(ref: str) -> bool:
    """Ask the cluster to stop a job (SIGTERM to its entry point, then SIGKILL)."""
    return bool(_client().stop_job(ref))


def after_cancel(store: Store, run: dict[str, Any]) -> bool:
    """After a run's cancel request: stop its job once none of the job's runs is left to go on."""
    ref = run.get("executor_ref")
    if not ref:
        return False
    going_on = [r for r in store.runs_with_status(ACTIVE)
                if r["executor_ref"] == ref and not r["cancel_requested"]]
    if going_on:
        return False
    status = job_status(ref)
    return status is not None and status[0] not in TERMINAL and stop(ref)


def reconcile(store: Store) -> list[tuple[str, str]]:
    """Match the store's queued/running Ray runs with their jobs; returns (run_id, reason) of runs
    marked failed or cancelled. Jobs recorded but never submitted are submitted now."""
    by_ref: dict[str, list[dict[str, Any]]] = {}
    for run in store.runs_with_status(ACTIVE):
        if run["executor"] == EXECUTOR and run["executor_ref"]:
            by_ref.setdefault(run["executor_ref"], []).append(run)
    ended = []
    for ref, runs in by_ref.items():
        status = job_status(ref)
        if status is None:
            _resubmit_recorded(store, ref, runs)
        elif status[0] in TERMINAL:
            ended += _close_runs_of_ended_job(store, ref, runs, *status)
    return ended


def _resubmit_recorded(store: Store, ref: str, runs: list[dict[str, Any]]) -> None:
    groups = {run["group_id"] for run in runs}
    group = groups.pop() if len(groups) == 1 and ref == submission_id(str(next(iter(groups), ""))) else None
    _submit_recorded(store, ref, group=group, run_ids=[run["id"] for run in runs])


def _close_runs_of_ended_job(store: Store, ref: str, runs, status: str, message: str) -> list[tuple[str, str]]:
    out = []
    for run in runs:
        stopped = run["cancel_requested"] or status == "STOPPED" and run["status"] == "queued"
        reason = (f"cancelled: Ray job {ref} was stopped before the run recorded its end" if stopped else
                  f"Ray job {ref} ended ({status}: {message.strip() or 'no message'}) while the run was "
                  f"{run['status']}")
        if store.fail_run(run["id"], reason, only_if_active=True, status="cancelled" if stopped else "failed"):
            out.append((run["id"], reason))
    return out


def describe() -> str:
    """One line on the cluster: address, Ray version, nodes, CPUs and GPUs (or why it is unreachable)."""
    url = address()
    try:
        version = _get_json(f"{url}/api/version").get("ray_version", "?")
        resources = _cluster_resources(url)
    except Exception as exc:
        return f"Ray cluster at {url} (unreachable: {type(exc).__name__}: {exc})"
    return (f"Ray cluster at {url} (Ray {version}; {resources.get('nodes', '?')} node(s), "
            f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs)")


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        return json.loads(response.read().decode())


def _cluster_resources(url: str) -> dict[str, float]:
    """Total resources from the dashboard's cluster-status endpoint (0 when it does not say)."""
    payload = _get_json(f"{url}/api/cluster_status")
    usage = payload.get("data", {}).get("clusterStatus", {}).get("loadMetricsReport", {}).get("usage", {})
    out = {name: float(pair[1]) for name, pair in usage.items() if isinstance(pair, list) and len(pair) == 2}
    nodes = payload.get("data", {}).get("clusterStatus", {}).get("autoscalerReport", {}).get("activeNodes", {})
    out["nodes"] = int(sum(nodes.values())) if isinstance(nodes, dict) and nodes else out.get("nodes", 0)
    return out
