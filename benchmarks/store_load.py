"""Run-store load: N worker processes write metrics at a fixed rate while the dashboard reads.

    python benchmarks/store_load.py [--writers 8] [--rate 200] [--seconds 10] [--writer-history STEPS]
                                    [--store URL] [--json]

Each writer is a real `StoreReporter` (the worker's write path: buffer, flush every --flush seconds in
one transaction with the heartbeat) emitting --rate metric values per second for --seconds. Meanwhile
this process repeats the dashboard's 100-run query (list 100 runs + counts by status + the loss curves
of those 100 runs downsampled to 200 points) and a live panel's refresh (`Store.new_metrics`: the rows
of one writer's run written since the last read) and times them. The same queries are timed first with no writers, in the
same process, as the baseline. Prints rows written vs expected (must be equal), the achieved write
rate, the median cost of one flush transaction (each writer's median, then the median over writers;
wall and the flushing thread's CPU time), the CPU time of one dashboard query (robust to a busy machine),
read latency median / p95 idle and under load with their ratio, and whether the goals hold
(100-run query under load: median <= 100 ms, p95 <= 250 ms; no row lost). Exit status 1 when a row
is lost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

from samlab.runs.store import Store
from samlab.runs.worker import StoreReporter

HISTORY_STEPS = 2000  # per seeded run: the dashboard reads curves of this length
GOAL_MEDIAN_MS = 100.0
GOAL_P95_MS = 250.0


def writer(url: str, run_id: str, rate: float, seconds: float, flush_s: float, first_step: int = 0) -> None:
    """Emit `rate` values per second (two metrics per step) for `seconds`; print how many."""
    store = Store(url)
    flush_times: list[float] = []
    flush_cpu: list[float] = []
    write = store.flush

    def timed_flush(*args, **kwargs):  # the cost of one flush transaction, as the worker pays it
        t0, c0 = time.perf_counter(), time.thread_time()  # SQLite runs in the calling thread
        try:
            return write(*args, **kwargs)
        finally:
            flush_times.append(time.perf_counter() - t0)
            flush_cpu.append(time.thread_time() - c0)

    store.flush = timed_flush
    reporter = StoreReporter(store, run_id, flush_s=flush_s)
    reporter.start()
    t0 = time.monotonic()
    step = first_step
    while (elapsed := time.monotonic() - t0) < seconds:
        due = first_step + int(elapsed * rate / 2)
        while step < due:
            reporter.metrics("step", step, {"loss": 1.0 / (step + 1), "acc": step % 100 / 100})
            step += 1
        reporter.progress(elapsed, seconds, "writing")
        time.sleep(0.005)
    reporter.close()
    print(json.dumps({"rows": 2 * (step - first_step), "flush_errors": reporter.flush_errors,
                      "flush_median_ms": 1000 * statistics.median(flush_times),
                      "flush_cpu_median_ms": 1000 * statistics.median(flush_cpu)}), flush=True)


def seed(store: Store, runs: int) -> list[str]:
    ids = store.create_runs([{"kind": "train", "params": {"seed": i}, "name": f"history {i}"}
                             for i in range(runs)])
    for run_id in ids:
        store.flush(run_id, [("step", s, "train_loss", 1.0 / (s + 1), 0.0) for s in range(HISTORY_STEPS)])
    return ids


def dashboard_query(store: Store, ids: list[str], cpu: list[float] | None = None) -> float:
    """Wall seconds of the 100-run query; its CPU seconds (this process) appended to `cpu`."""
    t0, c0 = time.perf_counter(), time.process_time()
    store.list_runs(limit=100)
    store.count_by_status()
    store.metrics(ids, names=["train_loss"], kind="step", max_points=200)
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rate", type=float, default=200.0, help="metric values per second per writer")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flush", type=float, default=0.5, help="writer flush interval (s)")
    parser.add_argument("--store", default=None, help="store URL (default: a fresh SQLite file in /tmp)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--writer-history", type=int, default=0,
                        help="steps each writer's run already has (a long run's flushes: its curves' buckets)")
    parser.add_argument("--writer", nargs=6, metavar=("URL", "RUN_ID", "RATE", "SECONDS", "FLUSH", "FIRST"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        url, run_id, rate, seconds, flush, first = args.writer
        writer(url, run_id, float(rate), float(seconds), float(flush), int(first))
        return 0

    url = args.store or f"sqlite:///{tempfile.mkdtemp(prefix='samlab-bench-')}/samlab.db"
    store = Store(url)
    history = seed(store, 100)
    idle_cpu: list[float] = []
    loaded_cpu: list[float] = []
    idle = [dashboard_query(store, history, idle_cpu) for _ in range(15)]

    run_ids = store.create_runs([{"kind": "train", "params": {"w": i}, "name": f"writer {i}"}
                                 for i in range(args.writers)])
    for run_id in run_ids:  # the same curves the writers extend, already this long
        for start in range(0, args.writer_history, 2000):
            store.flush(run_id, [("step", s, name, value, 0.0) for s in range(start, min(start + 2000, args.writer_history))
                                 for name, value in (("loss", 1.0 / (s + 1)), ("acc", s % 100 / 100))])
    procs = [subprocess.Popen([sys.executable, __file__, "--writer", url, run_id, str(args.rate),
                               str(args.seconds), str(args.flush), str(args.writer_history)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for run_id in run_ids]
    loaded, refreshes, refreshed_rows = [], [], 0
    cursor = None  # a live view's incremental read (Store.new_metrics), as the Train page refreshes
    while any(p.poll() is None for p in procs):
        loaded.append(dashboard_query(store, history, loaded_cpu))
        t0 = time.perf_counter()
        new, cursor, _ = store.new_metrics(run_ids[0], cursor)
        refreshes.append(time.perf_counter() - t0)
        refreshed_rows += len(new)
        time.sleep(0.05)
    reports, errors = [], []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
        else:
            reports.append(json.loads(out.strip().splitlines()[-1]))
    expected = sum(r["rows"] for r in reports) + 2 * args.writer_history * len(run_ids)
    written = int(store.metrics(run_ids).shape[0])
    first_rows = int(store.metrics([run_ids[0]]).shape[0])
    refreshed_rows += len(store.new_metrics(run_ids[0], cursor)[0])  # what came after the last read
    figures = {
        "writers": args.writers,
        "rate_per_writer": args.rate,
        "seconds": args.seconds,
        "flush_s": args.flush,
        "writer_history_steps": args.writer_history,
        "rows_expected": expected,
        "rows_written": written,
        "rows_equal": expected == written and not errors,
        "writer_errors": errors,
        "flush_retries": sum(r["flush_errors"] for r in reports),
        "achieved_rows_per_s": (written - 2 * args.writer_history * len(run_ids)) / args.seconds,
        "target_rows_per_s": args.writers * args.rate,
        "history_rows": 100 * HISTORY_STEPS,
        "read_idle_median_ms": 1000 * statistics.median(idle),
        "read_idle_p95_ms": 1000 * percentile(idle, 0.95),
        "read_loaded_median_ms": 1000 * statistics.median(loaded),
        "read_loaded_p95_ms": 1000 * percentile(loaded, 0.95),
        "reads_under_load": len(loaded),
        "read_cpu_idle_median_ms": 1000 * statistics.median(idle_cpu),
        "read_cpu_loaded_median_ms": 1000 * statistics.median(loaded_cpu),
        "flush_cpu_median_ms": statistics.median(r["flush_cpu_median_ms"] for r in reports) if reports else None,
        "flush_median_ms": statistics.median(r["flush_median_ms"] for r in reports) if reports else None,
        "live_refresh_median_ms": 1000 * statistics.median(refreshes) if refreshes else None,
        "live_refresh_rows_read": refreshed_rows,
        "live_refresh_rows_of_run": first_rows,
    }
    figures["goals_met"] = (figures["read_loaded_median_ms"] <= GOAL_MEDIAN_MS
                            and figures["read_loaded_p95_ms"] <= GOAL_P95_MS and figures["rows_equal"])
    figures["read_median_ratio_loaded_over_idle"] = figures["read_loaded_median_ms"] / figures["read_idle_median_ms"]
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        print(f"{args.writers} writers x {args.rate:g} values/s for {args.seconds:g}s (flush {args.flush:g}s, "
              f"{args.writer_history} steps of history per writer run), "
              f"store {url}")
        print(f"rows written {written} / expected {expected}: {'EQUAL' if figures['rows_equal'] else 'MISMATCH'}"
              f"  ({figures['achieved_rows_per_s']:.0f} rows/s of {figures['target_rows_per_s']:.0f} target; "
              f"flush retries {figures['flush_retries']}; writer errors {len(errors)})")
        print(f"100-run dashboard query ({figures['history_rows']} history rows, 200 points per curve):")
        print(f"  idle        median {figures['read_idle_median_ms']:7.1f} ms  p95 {figures['read_idle_p95_ms']:7.1f} ms")
        print(f"  under load  median {figures['read_loaded_median_ms']:7.1f} ms  p95 {figures['read_loaded_p95_ms']:7.1f} ms"
              f"  ({len(loaded)} reads)")
        print(f"  ratio loaded/idle (median) {figures['read_median_ratio_loaded_over_idle']:.2f}")
        print(f"  CPU of one query (this process): idle median {figures['read_cpu_idle_median_ms']:.1f} ms, "
              f"under load {figures['read_cpu_loaded_median_ms']:.1f} ms")
        if reports:
            print(f"one flush (median over writers of each writer's median): {figures['flush_median_ms']:.1f} ms wall, "
                  f"{figures['flush_cpu_median_ms']:.1f} ms CPU")
        if refreshes:
            print(f"live refresh of one writer's run: median {figures['live_refresh_median_ms']:.1f} ms; read "
                  f"{refreshed_rows} rows in all for the run's {first_rows} (each row once)")
        print(f"goals (under load: median <= {GOAL_MEDIAN_MS:g} ms, p95 <= {GOAL_P95_MS:g} ms, no row lost): "
              f"{'met' if figures['goals_met'] else 'NOT met'}")
    return 0 if figures["rows_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
