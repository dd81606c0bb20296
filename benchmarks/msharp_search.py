"""The search for a CPU setting where m-sharpness shows on a neural network.

    python benchmarks/msharp_search.py [CANDIDATE ...] [--select 0 1 2 3] [--eval 4 5 ... 11]
                                       [--workers 2] [--cache data/msharp_search.json] [--list]

Each candidate is a base run config, the micro-batch sizes m to sweep (the largest is the batch size:
plain SAM) and a ρ grid per m. Every (method, m, ρ, seed) run trains with samlab's own trainer. For
each method and m, ρ is chosen on the --select seeds (best mean test score); the table reports the
paired difference against SAM (m = batch, at its own chosen ρ) on the --eval seeds only, as
mean ± SE with z = mean / SE. Scores: test accuracy in points for classification, −test loss for
regression (so a positive difference always means "better than SAM").

Two kinds of candidates: "student" ones (the two-layer ReLU student on the relu-teacher set) train all
their runs at once with `samlab.student` (seconds per hundred runs; tested equal to the trainer);
"trainer" ones run samlab's trainer once per run, every ρ on the selection seeds and only the chosen ρ
on the evaluation seeds. Runs go to a JSON cache keyed by their config, so a rerun prints the tables
without training again. Workers are separate processes with one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samlab.config import DataConfig, RunConfig  # noqa: E402
from samlab.data import load_dataset  # noqa: E402
from samlab.paired import best_rho, select_then_compare  # noqa: E402
from samlab.student import StudentRun, train_students  # noqa: E402

DIGITS_BASE = {
    "data": {"name": "digits", "n_train": 512, "label_noise": 0.2},
    "model": {"name": "cnn", "width": 16, "norm": "bn"},
    "optim": {"method": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "cosine"}, "epochs": 30, "batch_size": 64, "device": "cpu", "checkpoint_every": 0,
}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of `base` with nested changes, data__noise_std=0.3 for base["data"]["noise_std"]."""
    raw = json.loads(json.dumps(base))
    for key, value in changes.items():
        *path, last = key.split("__")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


RHOS = {60: (0.003, 0.01, 0.02), 20: (0.01, 0.03, 0.1), 6: (0.01, 0.03, 0.1), 2: (0.003, 0.01, 0.03),
        1: (0.003, 0.01)}


def _student(n: int = 60, d: int = 10, width: int = 40, units: int = 2, noise: float = 0.0, init: float = 0.01,
             lr: float = 0.1, steps: int = 2000, rule: str = "normalized", rhos=None, lams=()) -> dict[str, Any]:
    """A two-layer ReLU student candidate (full batch, trained by samlab.student); `rhos`: {m: grid}."""
    rhos = rhos or RHOS
    return {"kind": "student", "n": n, "d": d, "width": width, "units": units, "noise": noise, "init": init,
            "lr": lr, "steps": steps, "rule": rule, "ms": sorted(rhos, reverse=True),
            "rhos": {m: list(grid) for m, grid in rhos.items()}, "lams": list(lams)}


# Candidates: "student" ones train all their runs at once with samlab.student (seconds); "trainer" ones
# run samlab's trainer once per run (a digits CNN run is ~10 s of CPU).
CANDIDATES: dict[str, dict[str, Any]] = {
    "relu-student": _student(lams=(10.0, 100.0, 1000.0)),
    "relu-student-usam": _student(rule="unnormalized", rhos={60: (0.1, 0.3), 20: (0.1, 0.3), 6: (0.1, 0.3),
                                                             2: (0.1, 0.3), 1: (0.1, 0.3)}),
    "relu-student-noisy": _student(noise=0.3),
    "relu-student-noisy-grid": _student(noise=0.3, lams=(3.0, 30.0, 300.0), rhos={
        60: (0.003, 0.01, 0.03), 20: (0.03, 0.1, 0.3), 6: (0.03, 0.1, 0.3), 2: (0.01, 0.03, 0.1),
        1: (0.003, 0.01, 0.03)}),
    "relu-student-4000": _student(steps=4000),
    "relu-student-wide": _student(width=160),
    "relu-student-init0.1": _student(init=0.1),
    # the lesson's digits preset: RW-SAM's λ × ρ against SAM's ρ, and the ghost-BatchNorm control at m = 8
    "digits-cnn-rwsam": {"kind": "trainer", "base": DIGITS_BASE, "reference": "m=64", "cells": {
        "m=64": {"set": {"optim.method": "sam"}, "rhos": [0.14, 0.28]},
        **{f"rwsam λ={lam:g}": {"set": {"optim.method": "rwsam", "optim.lam": lam}, "rhos": [0.14, 0.28]}
           for lam in (0.01, 0.02, 0.05)},
        "m=8": {"set": {"optim.method": "msam", "optim.m": 8}, "rhos": [0.07, 0.14]},
        "ghostbn m=8": {"set": {"optim.method": "ghostbn", "optim.m": 8}, "rhos": [0.14, 0.28]},
    }},
}


def run_configs(candidate: dict[str, Any], seeds: list[int]) -> list[tuple[str, float, int, RunConfig]]:
    """Trainer candidates: (cell, ρ, seed, config) for every run of every cell and ρ of its grid."""
    runs = []
    for seed in seeds:
        for cell, spec in candidate["cells"].items():
            for rho in spec["rhos"]:
                raw = _with(candidate["base"], seed=seed, optim__rho=rho,
                            **{k.replace(".", "__"): v for k, v in spec["set"].items()})
                runs.append((cell, rho, seed, RunConfig.from_dict(raw)))
    return runs


def student_runs(candidate: dict[str, Any], seeds: list[int]) -> list[tuple[str, StudentRun]]:
    """Student candidates: (cell, run) for every run."""
    n = candidate["n"]
    runs = []
    for seed in seeds:
        runs.append(("sgd", StudentRun("sgd", n, 0.0, seed)))
        for m in candidate["ms"]:
            for rho in candidate["rhos"][m]:
                runs.append((f"m={m}", StudentRun("sam" if m == n else "msam", m, rho, seed)))
        for lam in candidate["lams"]:
            for rho in candidate["rhos"][n]:
                runs.append((f"rwsam λ={lam:g}", StudentRun("rwsam", n, rho, seed, lam)))
    return runs


def _train(config_json: str) -> dict[str, Any]:
    import torch

    from samlab import train

    torch.set_num_threads(1)
    cfg = RunConfig.from_json(config_json)
    start = time.perf_counter()
    result = train.run(cfg)
    summary = result.summary
    return {"status": result.status, "test_loss": summary["final_test_loss"], "test_acc": summary["final_test_acc"],
            "train_loss": summary["final_train_loss"], "seconds": time.perf_counter() - start}


def _train_students(candidate_json: str, runs: list[StudentRun]) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    c = json.loads(candidate_json)
    data = load_dataset(DataConfig(name="relu-teacher", n_train=c["n"], n_test=2000, n_features=c["d"],
                                   sparsity=c["units"], noise_std=c["noise"]))
    start = time.perf_counter()
    out = train_students(data, runs, width=c["width"], init_scale=c["init"], lr=c["lr"], steps=c["steps"],
                         rule=c["rule"])
    seconds = (time.perf_counter() - start) / len(runs)
    return [{"status": "completed" if math.isfinite(r["test_loss"]) else "diverged", **r, "seconds": seconds}
            for r in out]


def score(record: dict[str, Any], task_is_regression: bool) -> float:
    """Higher is better: −test loss (regression) or test accuracy in points."""
    if record["status"] != "completed":
        return -math.inf
    if task_is_regression:
        return -record["test_loss"]
    return 100.0 * record["test_acc"]


def _student_key(candidate: dict[str, Any], run: StudentRun) -> str:
    return json.dumps([candidate, run.method, run.m, run.rho, run.seed, run.lam], sort_keys=True)


def train_all(candidate: dict[str, Any], seeds: list[int], cache: dict[str, Any], workers: int,
              cache_path: Path) -> None:
    """Train what the cache lacks: trainer runs one per task, student runs in one batch per worker."""
    if candidate["kind"] == "student":
        todo = [run for _, run in student_runs(candidate, seeds) if _student_key(candidate, run) not in cache]
        if not todo:
            return
        print(f"training {len(todo)} student runs on {workers} workers ...", file=sys.stderr)
        by_seed = sorted({r.seed for r in todo})
        shares = [[r for r in todo if r.seed in by_seed[i::workers]] for i in range(workers)]
        shares = [share for share in shares if share]
        with ProcessPoolExecutor(max_workers=len(shares)) as pool:
            text = json.dumps(candidate, sort_keys=True)
            for share, records in zip(shares, pool.map(_train_students, [text] * len(shares), shares), strict=True):
                cache.update({_student_key(candidate, r): rec for r, rec in zip(share, records, strict=True)})
        cache_path.write_text(json.dumps(cache))
        return
    todo = [c.to_json() for *_, c in run_configs(candidate, seeds) if c.to_json() not in cache]
    if not todo:
        return
    print(f"training {len(todo)} runs on {workers} workers ...", file=sys.stderr)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done, (key, record) in enumerate(zip(todo, pool.map(_train, todo), strict=True), start=1):
            cache[key] = record
            if done % 10 == 0 or done == len(todo):
                cache_path.write_text(json.dumps(cache))


def collect(candidate: dict[str, Any], cache: dict[str, Any], seeds: list[int]):
    """scores[cell][ρ][seed] (higher is better), the reference cell (m = batch: SAM), seconds of training."""
    scores: dict[str, dict[float, dict[int, float]]] = {}
    seconds = 0.0
    if candidate["kind"] == "student":
        cells = [(cell, _student_key(candidate, run), run.rho, run.seed) for cell, run in student_runs(candidate, seeds)]
        regression, reference = True, f"m={candidate['n']}"
    else:
        cells = [(cell, cfg.to_json(), rho, seed) for cell, rho, seed, cfg in run_configs(candidate, seeds)]
        regression = candidate["base"]["data"]["name"] in ("relu-teacher", "sparse-regression")
        reference = candidate["reference"]
    for cell, key, rho, seed in cells:
        record = cache.get(key)
        if record is not None:
            seconds += record["seconds"]
            scores.setdefault(cell, {}).setdefault(rho, {})[seed] = score(record, regression)
    return scores, reference, seconds, regression


def narrowed(candidate: dict[str, Any], cache: dict[str, Any], select: list[int]) -> dict[str, Any]:
    """The trainer candidate with each cell's ρ grid cut to the ρ chosen on the `select` seeds."""
    scores, *_ = collect(candidate, cache, select)
    cells = {cell: {**spec, "rhos": [best_rho(scores[cell], select)]} for cell, spec in candidate["cells"].items()}
    return {**candidate, "cells": cells}


def table(name: str, candidate: dict[str, Any], cache: dict[str, Any], select: list[int],
          evaluate: list[int]) -> list[dict[str, Any]]:
    """One row per cell: ρ chosen on `select`, paired difference vs SAM (m = batch) on `evaluate`."""
    scores, reference, seconds, regression = collect(candidate, cache, select + evaluate)
    rows = select_then_compare(scores, reference, select, evaluate)
    out = []
    for cell, row in rows.items():
        values = [v for s, v in scores[cell][row["rho"]].items() if s in evaluate and math.isfinite(v)]
        out.append({"candidate": name, "cell": cell, **row, "score_mean": sum(values) / max(len(values), 1)})
    print(f"\n{name}: ρ chosen on seeds {select}, paired vs SAM ({reference}) on seeds {evaluate}; "
          f"{'score = −test MSE' if regression else 'score = test accuracy (points)'}; "
          f"{seconds:.0f} s of training in all")
    print(f"{'cell':>14} {'ρ':>7} {'score':>10} {'Δ vs SAM':>11} {'± SE':>9} {'z':>6} {'n':>3} {'wins':>5}")
    for r in out:
        print(f"{r['cell']:>14} {r['rho']:>7g} {r['score_mean']:>10.5g} {r['mean']:>+11.4g} {r['se']:>9.2g} "
              f"{r['z']:>6.2f} {r['n']:>3} {r['n_positive']:>5}")
    return out


def noise_table(name: str, candidate: dict[str, Any], cache: dict[str, Any], select: list[int],
                evaluate: list[int]) -> list[dict[str, Any]]:
    """Student candidates: tr V and ‖∇L‖ at the end of training (the train set, per-sample gradients), mean ± std
    over the evaluation seeds, each cell at the ρ chosen on the selection seeds."""
    scores, *_ = collect(candidate, cache, select)
    chosen = {cell: best_rho(by_rho, select) for cell, by_rho in scores.items()}
    values: dict[str, list[dict[str, float]]] = {}
    for cell, run in student_runs(candidate, evaluate):
        record = cache.get(_student_key(candidate, run))
        if record is not None and run.rho == chosen.get(cell) and record["status"] == "completed":
            values.setdefault(cell, []).append(record)
    print(f"\n{name}: gradient noise at the end of training, seeds {evaluate}, ρ chosen on {select}")
    print(f"{'cell':>14} {'ρ':>7} {'tr V':>12} {'± std':>10} {'‖∇L‖':>11} {'train loss':>11} {'n':>3}")
    rows = []
    for cell, recs in values.items():
        tv = [r["trace_v"] for r in recs]
        mean = sum(tv) / len(tv)
        std = (sum((t - mean) ** 2 for t in tv) / max(1, len(tv) - 1)) ** 0.5
        grad = sum(r["full_grad_norm"] for r in recs) / len(recs)
        train = sum(r["train_loss"] for r in recs) / len(recs)
        rows.append({"cell": cell, "rho": chosen[cell], "trace_v": mean, "trace_v_std": std, "grad_norm": grad,
                     "train_loss": train, "n": len(tv)})
        print(f"{cell:>14} {chosen[cell]:>7g} {mean:>12.4g} {std:>10.2g} {grad:>11.3g} {train:>11.4g} {len(tv):>3}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="*", help=f"of: {', '.join(CANDIDATES)} (default: all)")
    parser.add_argument("--select", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--eval", type=int, nargs="*", default=list(range(4, 12)))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default="data/msharp_search.json")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.candidates or list(CANDIDATES):
        candidate = CANDIDATES[name]
        if candidate["kind"] == "student":
            train_all(candidate, args.select + args.eval, cache, args.workers, cache_path)
        else:  # trainer runs are costly: the evaluation seeds train each cell at its chosen ρ only
            train_all(candidate, args.select, cache, args.workers, cache_path)
            train_all(narrowed(candidate, cache, args.select), args.eval, cache, args.workers, cache_path)
        rows += table(name, candidate, cache, args.select, args.eval)
        if candidate["kind"] == "student":
            rows += noise_table(name, candidate, cache, args.select, args.eval)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
