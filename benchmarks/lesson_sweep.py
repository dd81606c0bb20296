"""What the lesson's m-sharpness sweep costs on this machine, and what it finds.

    python benchmarks/lesson_sweep.py [--workers N] [--seeds 4,5,...] [--store URL] [--json]

Submits `samlab.sweeps.lesson_spec()` (the sweep the Lesson page launches: SGD, SAM, m-SAM at each m
and RW-SAM on the `relu-msharp` preset, 8 seeds) exactly as the page does — `samlab.runs.sweeps.submit`
with sweep workers (default: one single-threaded worker per core) — into a fresh store, waits for it,
and prints:

- the wall time from submission to the last run's end (the figure a user waits for), the sum of the
  runs' own times and the median run time per method;
- the paired differences against SAM (`samlab.sweeps.paired_differences`: mean ± standard error of
  the per-seed differences of −test loss, z, pairs better), so the timing run also shows that the
  sweep reproduces the lesson's result;
- the machine's load average at the start and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from samlab.runs.store import Store
from samlab.runs.sweeps import progress, submit
from samlab.sweeps import LESSON_SEEDS, aggregate, lesson_spec, paired_differences


def run_times(store: Store, group_id: str) -> dict[str, list[float]]:
    """Each completed run's own wall time (finished − started), by method label (msam with its m)."""
    out: dict[str, list[float]] = {}
    for run in store.list_runs(group=group_id, limit=100_000):
        if run["status"] != "completed":
            continue
        optim = run["params"]["optim"]
        label = optim["method"] + (f" m={optim['m']}" if optim["method"] == "msam" else "")
        out.setdefault(label, []).append((run["finished_at"] - run["started_at"]).total_seconds())
    return out


def measure(store: Store, seeds: list[int], workers: int | None) -> dict:
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    group_id = submit(lesson_spec(seeds), store=store, workers=workers)
    while not (state := progress(group_id, store=store))["done"]:
        print(f"\r  {state['finished']}/{state['total']} runs finished, {time.monotonic() - t0:6.0f} s",
              end="", file=sys.stderr, flush=True)
        time.sleep(2.0)
    wall = time.monotonic() - t0
    print(file=sys.stderr)
    times = run_times(store, group_id)
    paired = paired_differences(aggregate(store, group_id))
    return {
        "runs": state["total"], "completed": state["counts"]["completed"], "wall_s": wall,
        "sum_run_s": sum(sum(v) for v in times.values()),
        "median_run_s": {k: statistics.median(v) for k, v in sorted(times.items())},
        "workers": workers, "cores": os.cpu_count(), "load_start": load0, "load_end": os.getloadavg()[0],
        "paired": paired.to_dict(orient="records"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="sweep workers (default: one per core)")
    parser.add_argument("--seeds", default=",".join(map(str, LESSON_SEEDS)))
    parser.add_argument("--store", default=None, help="store URL (default: a fresh SQLite file in /tmp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(args.store or f"sqlite:///{Path(tmp) / 'runs.db'}")
        report = measure(store, seeds, args.workers)
        store.dispose()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"{report['completed']}/{report['runs']} runs completed in {report['wall_s'] / 60:.1f} min wall "
          f"({report['cores']} cores, load {report['load_start']:.1f} -> {report['load_end']:.1f}); "
          f"sum of run times {report['sum_run_s'] / 60:.1f} min")
    for label, seconds in report["median_run_s"].items():
        print(f"  median run {label:>10}: {seconds:6.1f} s")
    print("paired against SAM (positive = lower test loss than SAM):")
    for row in report["paired"]:
        m = "" if row["m"] != row["m"] else f" m={row['m']:g}"
        if row["method"] in ("sam", "msam") and row["m"] == row["reference_m"]:
            print(f"  {row['method']}{m}: the reference")
            continue
        print(f"  {row['method']}{m}: {row['diff_mean']:+.5f} ± {row['diff_se']:.5f} "
              f"(z {row['z']:+.1f}, {row['n_better']}/{row['n_pairs']} better)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
