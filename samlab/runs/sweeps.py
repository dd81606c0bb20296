"""Launching a sweep: queue its group, run it with detached sweep workers, follow and cancel it.

Small runs are many, so besides the scheduler (one worker process per run) a sweep can be executed by
*sweep workers*: detached processes that claim the group's queued runs one after another and run each
through the same worker code in-process, so a run costs its training and not a Python start-up plus
the torch import.

    python -m samlab.runs.sweeps work GROUP_ID [--store URL] [--linger SECONDS]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from samlab.runs import jobs
from samlab.runs.executors import backend_name, hostname, local_slots, spawn_module
from samlab.runs.store import FINAL, Store, open_store
from samlab.runs.worker import run_worker
from samlab.sweeps import SweepSpec, sweep_configs

SWEEP_EXECUTOR = "sweep"


# -- running --------------------------------------------------------------------------------------
def submit(spec: SweepSpec, *, store: Store | str | None = None, workers: int | None = None,
           runner: str = "sweep") -> str:
    """Queue the sweep as one group and start it; returns the group id.

    runner="sweep": `workers` detached sweep workers (default: one per local slot) run the members
    in-process one after another; runner="scheduler": the scheduler starts one worker per run.
    With SAMLAB_EXECUTOR=ray the sweep is one Ray job whatever the runner (samlab.runs.ray_executor).
    """
    if runner not in ("sweep", "scheduler"):
        raise ValueError(f"runner: must be 'sweep' or 'scheduler' (got {runner!r})")
    if backend_name() == "ray":
        runner = "scheduler"  # jobs.submit_sweep hands the group to the cluster as one job
    st = open_store(store)
    group_id = jobs.submit_sweep(sweep_configs(spec), spec.name, store=st, start=runner == "scheduler")
    if runner == "sweep":
        start_workers(group_id, store=st, workers=workers)
    return group_id


def start_workers(group_id: str, *, store: Store | str | None = None, workers: int | None = None,
                  linger_s: float = 0.0) -> list[int]:
    """Launch detached sweep workers for a group; returns their pids.

    With GPUs: one worker per visible GPU (the scheduler's slots). On a CPU: `workers` (default: one
    per core) single-threaded workers, the cores split between them — small runs waste most of a
    second thread on synchronisation, so several one-thread runs side by side finish more runs per
    minute than one run using every core. `linger_s`: how long an idle worker waits for more queued
    runs before it exits (a search queues its trials over time).
    """
    if backend_name() == "ray":
        raise ValueError("workers: with SAMLAB_EXECUTOR=ray the sweep's Ray job runs its members; "
                         "no local sweep workers are started")
    st = open_store(store)
    slots = local_slots()
    cores = os.cpu_count() or 1
    on_gpu = slots[0].name.startswith("gpu")
    count = (len(slots) if on_gpu else cores) if workers is None else workers
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"workers: must be an integer >= 1 (got {workers!r})")
    log_dir = Path(st.runs_root) / "sweeps"
    pids = []
    for i in range(count):
        env = dict(os.environ) | slots[i % len(slots)].env
        if not on_gpu:
            env["OMP_NUM_THREADS"] = str(max(1, cores // count))
        proc = spawn_module("samlab.runs.sweeps", ["work", group_id, "--store", st.url, "--linger", f"{linger_s:g}"],
                            log_dir / f"{group_id}-{i}.log", env=env)
        pids.append(proc.pid)
    return pids


def work(group_id: str, *, store: Store | str | None = None, limit: int | None = None,
         linger_s: float = 0.0, poll_s: float = 0.5) -> int:
    """Claim and run the group's queued runs one after another in this process; returns how many ran.
    With nothing queued it waits up to `linger_s` seconds for more before it returns.

    Each run goes through `samlab.runs.worker.run_worker`, exactly as in its own process: same store
    records, heartbeats, cancellation and failure handling. Claims are atomic, so several sweep
    workers (and the scheduler) can drain one group together.
    """
    st = open_store(store)
    ran = 0
    while limit is None or ran < limit:
        run_id = _claim_next(st, group_id, hostname())
        idle_until = time.monotonic() + linger_s
        while run_id is None and time.monotonic() < idle_until:
            time.sleep(poll_s)
            run_id = _claim_next(st, group_id, hostname())
        if run_id is None:
            break
        st.set_launch(run_id, os.getpid(), f"{SWEEP_EXECUTOR}:{os.getpid()}")
        run_worker(run_id, st.url)
        ran += 1
    return ran


def _claim_next(st: Store, group_id: str, host: str) -> str | None:
    for run in sorted(st.list_runs(status="queued", group=group_id, limit=100_000), key=_queue_order):
        if st.claim(run["id"], host, SWEEP_EXECUTOR):
            return run["id"]
    return None


def _queue_order(run: dict[str, Any]) -> tuple:
    return (run["created_at"], run["id"])


def cancel(group_id: str, *, store: Store | str | None = None) -> int:
    """Cancel every queued or running member; returns how many were asked to stop."""
    st = open_store(store)
    members = st.list_runs(status=["queued", "running"], group=group_id, limit=100_000)
    for run in members:
        jobs.cancel(run["id"], store=st)
    return len(members)


def progress(group_id: str, *, store: Store | str | None = None) -> dict[str, Any]:
    """The sweep as a whole: counts by status, fraction done (running runs count by their own
    progress), and throughput (finished runs per minute since the first start)."""
    st = open_store(store)
    runs = st.list_runs(group=group_id, limit=100_000)
    if not runs:
        raise ValueError(f"group_id: no runs in group {group_id!r}")
    counts = {status: 0 for status in ("queued", "running", *FINAL)}
    for run in runs:
        counts[run["status"]] = counts.get(run["status"], 0) + 1
    finished = [r for r in runs if r["status"] in FINAL]
    running = [r for r in runs if r["status"] == "running"]
    done = len(finished) + sum(float(r["progress"] or 0.0) for r in running)
    started = [r["started_at"] for r in runs if r["started_at"] is not None]
    ended = [r["finished_at"] for r in finished if r["finished_at"] is not None]
    minutes = (max(ended) - min(started)).total_seconds() / 60 if started and ended else float("nan")
    return {
        "group_id": group_id,
        "total": len(runs),
        "counts": counts,
        "fraction": done / len(runs),
        "finished": len(finished),
        "runs_per_minute": len(finished) / minutes if minutes and minutes > 0 else float("nan"),
        "done": len(finished) == len(runs),
    }


def wait(group_id: str, *, store: Store | str | None = None, timeout: float | None = None,
         poll_s: float = 1.0) -> dict[str, Any]:
    """Block until every member reached a final status (or `timeout` seconds); returns `progress`."""
    st = open_store(store)
    return poll_until_done(lambda: progress(group_id, store=st), timeout=timeout, poll_s=poll_s)


def poll_until_done(read: Callable[[], dict[str, Any]], *, timeout: float | None,
                    poll_s: float) -> dict[str, Any]:
    """Call `read` every `poll_s` seconds until its result says "done" (or `timeout` seconds); return it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = read()
        if state["done"] or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll_s)


# -- command line -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samlab.runs.sweeps", description="sweep workers")
    sub = parser.add_subparsers(dest="command", required=True)
    work_cmd = sub.add_parser("work", help="run a group's queued runs one after another in this process")
    work_cmd.add_argument("group_id")
    work_cmd.add_argument("--store", default=None, help="store URL (default: SAMLAB_STORE or data/runs)")
    work_cmd.add_argument("--linger", type=float, default=0.0,
                          help="seconds to wait for more queued runs before exiting (default 0)")
    args = parser.parse_args(argv)
    print(f"sweep worker pid {os.getpid()}: group {args.group_id}", flush=True)
    work(args.group_id, store=args.store, linger_s=max(0.0, args.linger))  # each run writes its own log from here on
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
