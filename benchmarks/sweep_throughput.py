"""Runs per minute of a sweep of small runs: sweep workers (runs in-process, one after another) against
the scheduler (one worker process per run), on the same grid, in the same process, one after the other.

    python benchmarks/sweep_throughput.py [--seeds 4] [--epochs 2] [--json]

Each path gets its own temporary store; the figure is finished runs per minute from the first start to
the last finish (`samlab.runs.sweeps.progress`). The machine is shared and noisy: compare the ratio, not the
absolute numbers, and repeat (--repeats) to see the spread (medians are printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from samlab.config import RunConfig
from samlab.runs.store import Store
from samlab.runs.sweeps import submit, wait
from samlab.sweeps import SweepSpec


def tiny_spec(seeds: int, epochs: int) -> SweepSpec:
    base = RunConfig.from_dict({
        "data": {"name": "digits", "n_train": 256},
        "model": {"name": "mlp", "width": 64, "depth": 1},
        "optim": {"method": "sgd", "lr": 0.05, "momentum": 0.9},
        "schedule": {"name": "cosine"}, "epochs": epochs, "batch_size": 64, "device": "cpu",
        "checkpoint_every": 0,
    })
    return SweepSpec(base, ms=[64, 8], rhos=[0.1], seeds=list(range(seeds)), methods=["sgd", "sam", "msam"],
                     name="throughput")


def measure(runner: str, spec: SweepSpec) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'runs.db'}")
        t0 = time.perf_counter()
        group = submit(spec, store=store, runner=runner)
        state = wait(group, store=store, poll_s=0.5)
        seconds = time.perf_counter() - t0
        store.dispose()
    return {"runner": runner, "runs": state["total"], "completed": state["counts"]["completed"],
            "wall_s": seconds, "runs_per_minute": 60 * state["total"] / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    spec = tiny_spec(args.seeds, args.epochs)
    results = {"sweep": [], "scheduler": []}
    for _ in range(args.repeats):
        for runner in ("scheduler", "sweep"):
            results[runner].append(measure(runner, spec))
    med = {r: statistics.median(x["runs_per_minute"] for x in rows) for r, rows in results.items()}
    report = {"runs_per_minute": med, "ratio_sweep_over_scheduler": med["sweep"] / med["scheduler"],
              "runs_per_sweep": results["sweep"][0]["runs"], "repeats": args.repeats, "raw": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['runs_per_sweep']} runs per sweep, median of {args.repeats} repeat(s)")
        for runner, value in med.items():
            print(f"  {runner:>9}: {value:6.1f} runs/min")
        print(f"  ratio sweep / scheduler: {report['ratio_sweep_over_scheduler']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
