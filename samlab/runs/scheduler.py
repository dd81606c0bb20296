"""The local scheduler: starts queued runs on free slots, watches their processes, exits when idle.

    python -m samlab.runs.scheduler [--store URL]

`samlab.runs.jobs.ensure_scheduler()` starts it on demand as a detached process (own session), so runs go on
when the UI or the CLI that submitted them exits. A file lock (one per host and store URL, beside the
run folders) keeps a single scheduler per host. Each tick it
  - reaps workers that exited: a run still `running` after its worker is gone is marked failed with the
    exit code and the tail of its log;
  - hard-kills (process group, SIGKILL) workers that ignored a cancel request for SAMLAB_CANCEL_TIMEOUT_S
    seconds (default 30) and marks them cancelled;
  - reconciles every few seconds (stale heartbeats, dead pids on this host: `reconcile`);
  - launches queued runs, oldest first, while slots are free (`samlab.runs.executors.local_slots`).
It exits after SAMLAB_SCHEDULER_IDLE_S seconds (default 30) with nothing queued and nothing running.

Public API: Scheduler(store, executor, slots), Scheduler.tick() -> bool, Scheduler.serve() -> int,
reconcile(store=None, *, stale_after_s=None) -> [(run_id, reason)] (running runs whose heartbeat is older
than SAMLAB_STALE_S, default 60 s by the database clock, or whose worker pid on this host is gone, become
failed with the reason; with the Ray backend runs are also matched with their Ray jobs' status),
lock_path(store), try_lock(path) -> fd | None, main(argv).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from samlab.runs.executors import (
    Executor,
    Slot,
    backend_name,
    env_float,
    get_executor,
    hostname,
    local_slots,
    pid_alive,
    slot_of,
)
from samlab.runs.store import Store, open_store

RECONCILE_EVERY_S = 5.0
LOG_TAIL_CHARS = 2000


def lock_path(store: Store) -> Path:
    digest = hashlib.sha1(store.url.encode()).hexdigest()[:10]
    return store.runs_root / f".scheduler-{hostname()}-{digest}.lock"


def try_lock(path: Path) -> int | None:
    """An exclusive lock on `path` (a file descriptor to keep open), or None when another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _log(message: str) -> None:
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}", flush=True)


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f" ({signal.Signals(-code).name})"
        except ValueError:
            return ""
    return ""


def _log_tail(path: str | None) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_CHARS))
            return f.read().decode("utf-8", "replace")
    except (OSError, TypeError):
        return ""


def _dead_reason(run: dict[str, Any], now, stale_after_s: float, host: str) -> str | None:
    if run["host"] == host and run["pid"] and not pid_alive(int(run["pid"])):
        return (f"worker process {run['pid']} on {host} is gone without recording a final status "
                "(killed, out of memory, or the machine restarted)")
    beat = run["heartbeat_at"]
    age = None if beat is None else (now - beat).total_seconds()
    if age is None or age > stale_after_s:
        shown = "never" if age is None else f"{age:.1f}s ago"
        return (f"heartbeat stale: last {shown} (limit {stale_after_s:g}s, database clock); the worker on "
                f"{run['host'] or 'an unknown host'} stopped without recording a final status")
    return None


def reconcile(store: Store | str | None = None, *, stale_after_s: float | None = None) -> list[tuple[str, str]]:
    """Mark running runs whose worker is gone as failed, with the reason; returns (run_id, reason)."""
    st = open_store(store)
    stale = stale_after_s if stale_after_s is not None else env_float("SAMLAB_STALE_S", 60.0, 0.0)
    host = hostname()
    ended_jobs = []
    if backend_name() == "ray":
        from samlab.runs import ray_executor

        ended_jobs = ray_executor.reconcile(st)
    running = st.runs_with_status(["running"])
    if not running:
        return ended_jobs
    now = st.server_now()
    failed = []
    for run in running:
        reason = _dead_reason(run, now, stale, host)
        if reason is not None and st.fail_run(run["id"], reason):
            failed.append((run["id"], reason))
    return ended_jobs + failed


class Scheduler:
    """Launches queued runs on free slots of this host and watches them."""

    def __init__(self, store: Store, executor: Executor, slots: list[Slot], *, poll_s: float = 0.5,
                 idle_exit_s: float = 30.0, cancel_timeout_s: float = 30.0) -> None:
        self.store = store
        self.executor = executor
        self.slots = slots
        self.poll_s = poll_s
        self.idle_exit_s = idle_exit_s
        self.cancel_timeout_s = cancel_timeout_s
        self.host = hostname()
        self.my_slots: dict[str, str] = {}  # run id -> slot name, for workers launched here
        self._last_reconcile = 0.0

    def tick(self) -> bool:
        """One round; True while there is work (runs of ours alive or runs queued)."""
        self._reap()
        self._enforce_cancel_timeouts()
        if time.monotonic() - self._last_reconcile > RECONCILE_EVERY_S:
            self._last_reconcile = time.monotonic()
            for run_id, reason in reconcile(self.store):
                _log(f"run {run_id} failed: {reason}")
        queued = self._launch_queued()
        return bool(self.my_slots) or queued

    def _reap(self) -> None:
        for run_id, code in self.executor.reap():
            self.my_slots.pop(run_id, None)
            run = self.store.get_run(run_id)
            _log(f"run {run_id} worker exited with code {code}; status {run['status']}")
            if run["status"] == "running":
                reason = (f"worker exited with code {code}{_signal_name(code)} without recording a final "
                          f"status; end of its log:\n{_log_tail(run['log_path'])}")
                self.store.fail_run(run_id, reason)

    def _enforce_cancel_timeouts(self) -> None:
        now = None
        for run in self.store.runs_with_status(["running"], host=self.host):
            if not run["cancel_requested"] or run["cancel_requested_at"] is None:
                continue
            now = now or self.store.server_now()
            waited = (now - run["cancel_requested_at"]).total_seconds()
            if waited <= self.cancel_timeout_s:
                continue
            killed = self.executor.kill(run)
            if killed or self.executor.alive(run) is False:
                status = self.store.stopped_status(run["id"])
                self.store.fail_run(run["id"], f"{status}: the worker did not stop within "
                                    f"{self.cancel_timeout_s:g}s of the request and was killed",
                                    status=status)
                _log(f"run {run['id']} hard-killed after {waited:.1f}s")

    def _free_slots(self) -> list[Slot]:
        busy = set(self.my_slots.values())
        busy.update(slot_of(r) for r in self.store.runs_with_status(["running"], host=self.host)
                    if r["executor"] == self.executor.name)
        return [slot for slot in self.slots if slot.name not in busy]

    def _launch_queued(self) -> bool:
        """Start queued runs on free slots; True when runs remain queued."""
        free = self._free_slots()
        if not free:
            return self.has_queued()
        for run in self.store.runs_with_status(["queued"], limit=len(free)):
            if not self.store.claim(run["id"], self.host, self.executor.name):
                continue  # cancelled meanwhile, or another scheduler took it
            slot = free.pop(0)
            try:
                pid, ref = self.executor.launch(run, self.store.url, slot)
            except Exception as exc:  # a run that cannot start fails alone; the scheduler goes on
                self.store.fail_run(run["id"], f"launch failed on {self.host}: {type(exc).__name__}: {exc}")
                _log(f"run {run['id']} launch failed: {exc}")
                continue
            self.my_slots[run["id"]] = slot.name
            self.store.set_launch(run["id"], pid, ref)
            _log(f"run {run['id']} ({run['kind']}) started as pid {pid} on {slot.name}")
        return self.has_queued()

    def has_queued(self) -> bool:
        return bool(self.store.runs_with_status(["queued"], limit=1))

    def serve(self, lock_fd: int) -> int:
        """Tick until idle for `idle_exit_s`; gives the lock back, then re-checks the queue once more so a
        run submitted while it was leaving is never stranded."""
        _log(f"scheduler pid {os.getpid()} on {self.host}: {len(self.slots)} slot(s) "
             f"{[s.name for s in self.slots]}, store {self.store.url}")
        idle_since = time.monotonic()
        while True:
            try:
                busy = self.tick()
            except Exception as exc:  # a database hiccup must not end the scheduler
                _log(f"tick failed: {type(exc).__name__}: {exc}")
                busy = True
            if busy:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self.idle_exit_s:
                release(lock_fd)
                if not self.has_queued():
                    _log("idle: exiting")
                    return 0
                lock_fd = try_lock(lock_path(self.store))
                if lock_fd is None:
                    _log("another scheduler took over: exiting")
                    return 0
                idle_since = time.monotonic()
            time.sleep(self.poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samlab.runs.scheduler", description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="store URL (default: SAMLAB_STORE or data/runs)")
    args = parser.parse_args(argv)
    store = open_store(args.store)
    fd = try_lock(lock_path(store))
    if fd is None:
        _log("a scheduler is already running for this store on this host")
        return 0
    scheduler = Scheduler(
        store, get_executor(), local_slots(),
        poll_s=env_float("SAMLAB_SCHEDULER_POLL_S", 0.5, 0.01, 60),
        idle_exit_s=env_float("SAMLAB_SCHEDULER_IDLE_S", 30.0, 0.0, 86400),
        cancel_timeout_s=env_float("SAMLAB_CANCEL_TIMEOUT_S", 30.0, 0.0, 86400),
    )
    return scheduler.serve(fd)


if __name__ == "__main__":
    sys.exit(main())
