"""Entry point of a samlab Ray job: one Ray task per run, each writing to the shared store.

    python -m samlab.runs.ray_job --store URL --group ID        the queued runs of a sweep
    python -m samlab.runs.ray_job --store URL --run ID [...]    single runs

Submitted by samlab.runs.ray_executor through Ray's Jobs API; this process is the job's driver. Each run
becomes a task with the resources it needs — num_gpus=1 when its device is CUDA (or "auto" on a
cluster with GPUs), else num_cpus=1 — and max_retries=0 (a failed run is recorded, never silently
re-run). The task claims the run in the store (atomically: a run cancelled meanwhile, or taken by
another job, is skipped) and runs it through samlab.runs.worker's run logic: heartbeats, metrics, the
cancel flag, checkpoints, failure tracebacks. The driver watches its tasks: a run whose cancel
request is older than SAMLAB_CANCEL_TIMEOUT_S (default 30) has its task killed and is marked
cancelled; a task lost to a dead worker or node marks its run failed. On SIGTERM (the job is
stopped) the driver asks every run to stop and waits briefly for them before exiting.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from samlab.runs.executors import env_float, hostname
from samlab.runs.store import Store, open_store

STOP_GRACE_S = 2.0  # Ray kills a stopped job's entry point a few seconds after SIGTERM


def run_one(run_id: str, store_url: str) -> int:
    """The Ray task: claim the run and execute it exactly as a local worker process would."""
    from samlab.runs.ray_executor import EXECUTOR
    from samlab.runs.worker import run_worker

    store = open_store(store_url)
    if not store.claim(run_id, hostname(), EXECUTOR):
        return 3  # cancelled before it started, or already taken
    return run_worker(run_id, store_url)


def wants_gpu(run: dict[str, Any], cluster_gpus: float) -> bool:
    device = str(run["params"].get("device", "auto")) if isinstance(run["params"], dict) else "auto"
    return device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)


def _select(store: Store, group: str | None, run_ids: list[str]) -> list[dict[str, Any]]:
    if group:
        runs = store.list_runs(status="queued", group=group, limit=100_000)
        return sorted(runs, key=lambda r: (r["created_at"], r["id"]))
    return [run for run in (store.get_run(run_id) for run_id in run_ids) if run["status"] == "queued"]


class Driver:
    """Fans out the tasks and watches them until every one has ended."""

    def __init__(self, store: Store, runs: list[dict[str, Any]], *, poll_s: float = 0.5,
                 cancel_timeout_s: float = 30.0) -> None:
        import ray

        self.ray = ray
        self.store = store
        self.poll_s = poll_s
        self.cancel_timeout_s = cancel_timeout_s
        gpus = float(ray.cluster_resources().get("GPU", 0))
        task = ray.remote(max_retries=0)(run_one)
        self.pending: dict[Any, str] = {}
        for run in runs:
            resources = {"num_gpus": 1} if wants_gpu(run, gpus) else {"num_cpus": 1}
            self.pending[task.options(**resources, name=f"samlab-run-{run['id']}").remote(run["id"], store.url)] = \
                run["id"]
        self.stopping = False

    def serve(self) -> int:
        while self.pending:
            ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=self.poll_s)
            for ref in ready:
                self._collect(ref, self.pending.pop(ref))
            self._kill_overdue_cancels()
        return 0

    def _collect(self, ref, run_id: str) -> None:
        try:
            code = self.ray.get(ref)
            print(f"run {run_id}: task ended with code {code}", flush=True)
        except Exception as exc:  # the worker process or its node died: the run cannot say so itself
            reason = f"Ray task of run {run_id} died: {type(exc).__name__}: {str(exc)[:2000]}"
            print(reason, flush=True)
            self.store.fail_run(run_id, reason, only_if_active=True)

    def _kill_overdue_cancels(self) -> None:
        overdue = set()
        now = None
        for ref, run_id in self.pending.items():
            run = self.store.get_run(run_id)
            if not run["cancel_requested"] or run["cancel_requested_at"] is None:
                continue
            now = now or self.store.server_now()
            if (now - run["cancel_requested_at"]).total_seconds() > self.cancel_timeout_s:
                overdue.add(ref)
        for ref in overdue:
            run_id = self.pending.pop(ref)
            self.ray.cancel(ref, force=True)
            status = self.store.stopped_status(run_id)
            self.store.fail_run(run_id, f"{status}: the run did not stop within {self.cancel_timeout_s:g}s of "
                                "the request; its Ray task was killed", status=status, only_if_active=True)

    def stop_all(self) -> None:
        """The job is being stopped: every run of ours is asked to stop (checkpoint, then end)."""
        self.stopping = True
        for run_id in self.pending.values():
            self.store.request_cancel(run_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samlab.runs.ray_job", description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="the shared store URL")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--group", help="run the queued runs of this sweep")
    which.add_argument("--run", dest="runs", action="append", default=[], help="run this queued run")
    args = parser.parse_args(argv)
    store = open_store(args.store)
    runs = _select(store, args.group, args.runs)
    print(f"samlab Ray job on {hostname()} (pid {os.getpid()}): {len(runs)} queued run(s)", flush=True)
    if not runs:
        return 0
    import ray

    ray.init(address="auto", logging_level="warning")
    driver = Driver(store, runs, cancel_timeout_s=env_float("SAMLAB_CANCEL_TIMEOUT_S", 30.0, 0.0, 86400))

    def on_sigterm(signum, frame):
        driver.stop_all()
        deadline = time.monotonic() + STOP_GRACE_S
        while driver.pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(driver.pending), num_returns=len(driver.pending), timeout=0.2)
            for ref in ready:
                driver.pending.pop(ref)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    return driver.serve()


if __name__ == "__main__":
    sys.exit(main())
