"""The worker: runs one stored run in this process and writes everything back to the store.

    python -m samlab.runs.worker RUN_ID [--store URL]

It takes the run (queued, or claimed for it by the scheduler), records pid, host and device, and calls
`samlab.tasks.task_function(kind)(params, reporter, workdir, resume)` with a `StoreReporter`. A
background thread flushes the buffered metrics every SAMLAB_FLUSH_S seconds (default 1) in one
transaction together with the heartbeat, progress and any partial result, and reads the run's
cancel flag; `should_stop()` then turns true and the task checkpoints and returns. SIGTERM asks for the
same graceful stop. An exception marks the run failed with the traceback in its error text and log.

The final status: a task result with "status" in completed|cancelled|diverged (the "train" task) is
taken as is, with its "summary"; otherwise a task that returns after a stop request is "cancelled", else
"completed"; a stop a search's pruner asked for (the run's stop_reason) ends as "pruned". On resume, the first time each curve (kind, name) is written again, its rows from that step
on are replaced, so a run resumed from a checkpoint has no duplicate or stale points.

Public API: StoreReporter(store, run_id, *, flush_s, resume), run_worker(run_id, store_url) -> int,
register_plugin_tasks(), main(argv).

A CPU worker given a thread range by its slot (SAMLAB_CPU_THREADS_RANGE) runs its task under a
`samlab.runs.cores.ThreadGovernor`, ticked whenever the task reports progress or checks for a stop; the
log's last lines say how long it ran at each thread count.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samlab import tasks
from samlab.devices import retain_freed_memory
from samlab.reporting import Reporter
from samlab.runs.cores import governor_from_env
from samlab.runs.curves import OpenCurve
from samlab.runs.executors import env_float, hostname
from samlab.runs.store import Store, open_store

FINAL_TASK_STATUSES = ("completed", "cancelled", "diverged")
RUN_MARKER = ".samlab-run"  # a run folder holds its run id here; jobs.delete removes only marked folders


def register_plugin_tasks() -> None:
    """Extra task kinds from SAMLAB_TASKS ("kind=package.module,..."), e.g. for plugins and tests."""
    spec = os.environ.get("SAMLAB_TASKS", "")
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, sep, module = item.partition("=")
        if not sep or not kind.strip() or not module.strip():
            raise ValueError(f"SAMLAB_TASKS: expected kind=module entries, got {item!r}")
        tasks.TASKS[kind.strip()] = module.strip()


class StoreReporter(Reporter):
    """A Reporter that buffers in memory and lets a background thread write to the store."""

    def __init__(self, store: Store, run_id: str, *, flush_s: float = 1.0, resume: bool = False,
                 on_check: Callable[[], None] | None = None) -> None:
        self.store = store
        self.on_check = on_check  # called on the task's thread whenever it reports progress or checks for a stop
        self.run_id = run_id
        self.flush_s = flush_s
        self.resume = resume
        self._rows: list[tuple[str, int, str, float | None, float]] = []
        self._progress: float | None = None
        self._message: str | None = None
        self._result: dict[str, Any] | None = None
        self._seen: set[tuple[str, str]] = set()
        self._open_curves: dict[tuple[str, str, str], OpenCurve] = {}  # its curves' last buckets (Store.flush)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.flush_errors = 0

    # -- Reporter ------------------------------------------------------------------------------
    def metrics(self, kind: str, step: int, values: dict[str, float]) -> None:
        now = time.time()
        rows = [(kind, int(step), str(name), _finite_or_none(value), now) for name, value in values.items()]
        with self._lock:
            self._rows.extend(rows)

    def progress(self, done: float, total: float, message: str = "") -> None:
        if self.on_check is not None:
            self.on_check()
        with self._lock:
            self._progress = 0.0 if total <= 0 else max(0.0, min(1.0, float(done) / float(total)))
            self._message = message

    def result(self, value: dict[str, Any]) -> None:
        with self._lock:
            self._result = value

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def should_stop(self) -> bool:
        if self.on_check is not None:
            self.on_check()
        return self._stop.is_set()

    # -- worker side ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._pump, name="store-flush", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the background thread and write what is left (retrying, so no row is dropped)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join()
        self.sync()

    def sync(self) -> None:
        """Write everything buffered now, retrying: the engine calls it before each checkpoint."""
        for attempt in range(10):
            if self.flush():
                return
            time.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"could not write the last metrics of run {self.run_id} to the store")

    def flush(self) -> bool:
        """One transaction with everything buffered; on failure the rows stay buffered."""
        with self._flush_lock:
            with self._lock:
                rows, self._rows = self._rows, []
                progress, message, result = self._progress, self._message, self._result
                self._result = None
            restart = self._restart_points(rows)
            try:
                cancel = self.store.flush(self.run_id, rows, progress, message, result, restart_from=restart,
                                          open_curves=self._open_curves)
            except Exception as exc:  # the database may be briefly unavailable: keep rows, retry later
                self.flush_errors += 1
                print(f"store write failed ({type(exc).__name__}: {exc}); will retry", file=sys.stderr)
                with self._lock:
                    self._rows[:0] = rows
                    if self._result is None:
                        self._result = result
                return False
            self._seen.update((kind, name) for kind, name, _ in restart)
            if cancel:
                self._stop.set()
            return True

    def _restart_points(self, rows) -> list[tuple[str, str, int]]:
        """On resume, the first step at which each curve is written again (its old tail is replaced)."""
        if not self.resume:
            return []
        first: dict[tuple[str, str], int] = {}
        for kind, step, name, _, _ in rows:
            key = (kind, name)
            if key not in self._seen and key not in first:
                first[key] = step
        return [(kind, name, step) for (kind, name), step in first.items()]

    def _pump(self) -> None:
        while not self._closing.wait(self.flush_s):
            self.flush()


def _finite_or_none(value: Any) -> float | None:
    number = float(value)
    return None if number != number else number


def _describe_device(params: dict[str, Any]) -> str:
    """The device the run will use, as recorded in the store (with the GPU's name)."""
    asked = str(params.get("device", "auto"))
    if asked in ("auto", "cpu") and os.environ.get("CUDA_VISIBLE_DEVICES") == "" and sys.platform != "darwin":
        return "cpu"  # a CPU slot hides every GPU: no need to import torch to know
    try:
        from samlab.devices import resolve_device

        dev = resolve_device(asked)
    except Exception as exc:  # the task reports the error itself; the store records what was asked
        return f"{asked} (unavailable: {exc})"
    text = str(dev)
    if dev.type == "cuda":
        import torch

        text = f"cuda:{dev.index or 0} {torch.cuda.get_device_name(dev.index or 0)}"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            text += f" (CUDA_VISIBLE_DEVICES={visible})"
    return text


def _redirect_output(log_path: Path) -> None:
    """Send stdout and stderr to the run's log, unless the launcher already did."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if os.path.exists(log_path) and os.path.samestat(os.fstat(2), os.stat(log_path)):
            return
    except OSError:
        pass
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _final_status(out: Any, stop_requested: bool) -> tuple[str, dict[str, Any] | None]:
    if isinstance(out, dict) and out.get("status") in FINAL_TASK_STATUSES:
        return out["status"], out.get("summary")
    return ("cancelled" if stop_requested else "completed"), None


def run_worker(run_id: str, store_url: str | None = None) -> int:
    """Run one stored run to its end in this process; the exit code is 0 unless it failed."""
    store = open_store(store_url)
    run = store.get_run(run_id)
    workdir = Path(run["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RUN_MARKER).write_text(run["id"])
    _redirect_output(Path(run["log_path"]))
    params, kind, resume = run["params"], run["kind"], run["resume_requested"]
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] worker pid {os.getpid()} on {hostname()}: "
          f"run {run['id']} ({kind}{', resume' if resume else ''})", flush=True)
    device = _describe_device(params)
    if not store.start_run(run["id"], os.getpid(), hostname(), device):
        print(f"run {run['id']} is {store.get_run(run['id'])['status']}, not waiting for a worker", flush=True)
        return 3
    governor = governor_from_env()  # a CPU run's thread count follows the machine's load
    reporter = StoreReporter(store, run["id"], flush_s=env_float("SAMLAB_FLUSH_S", 1.0, 0.01, 3600),
                             resume=resume, on_check=governor and governor.tick)
    signal.signal(signal.SIGTERM, lambda signum, frame: reporter.request_stop())
    reporter.start()
    try:
        register_plugin_tasks()
        out = tasks.task_function(kind)(params, reporter, workdir, resume)
    except BaseException as exc:  # noqa: BLE001 (any failure, even SystemExit, is recorded on the run)
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        headline = f"{'resume failed: ' if resume else ''}{type(exc).__name__}: {exc}"
        _close_quietly(reporter)
        store.finish_run(run["id"], "failed", error=f"{headline}\n\n{text}")
        return 1
    status, summary = _final_status(out, reporter.should_stop())
    reporter.close()
    if governor is not None:
        print(governor.summary(), flush=True)
    if status == "cancelled":
        status = store.stopped_status(run["id"])  # "pruned" when a search's pruner asked for the stop
    checkpoint = out.get("checkpoint") if isinstance(out, dict) else None
    result = out if isinstance(out, dict) and summary is None else None
    store.finish_run(run["id"], status, result=result, summary=summary, checkpoint_path=checkpoint)
    store.add_artifact(run["id"], "log", run["log_path"])
    if checkpoint:
        store.add_artifact(run["id"], "checkpoint", checkpoint)
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] run {run['id']} {status}", flush=True)
    return 0


def _close_quietly(reporter: StoreReporter) -> None:
    try:
        reporter.close()
    except Exception as exc:  # the failure being recorded matters more than the last rows
        print(f"could not write the last metrics: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samlab.runs.worker", description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--store", default=None, help="store URL (default: SAMLAB_STORE or data/runs)")
    args = parser.parse_args(argv)
    retain_freed_memory()  # one run per process
    try:
        return run_worker(args.run_id, args.store)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
