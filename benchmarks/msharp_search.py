"""The search for a CPU setting where m-sharpness shows on a neural network.

    python benchmarks/msharp_search.py [CANDIDATE ...] [--select 0 1 2 3] [--eval 4 5 ... 11]
                                       [--workers 2] [--cache data/msharp_search.json] [--list]

Each candidate is a base run config, the micro-batch sizes m to sweep (the largest is the batch size:
plain SAM) and a ρ grid per m. Every (method, m, ρ, seed) run trains with samlab's own trainer. For
each method and m, ρ is chosen on the --select seeds (best mean test score); the table reports the
paired difference against SAM (m = batch, at its own chosen ρ) on the --eval seeds only, as
mean ± SE with z = mean / SE. Scores: test accuracy in points for classification, −test loss for
regression (so a positive difference always means "better than SAM").

Runs go to a JSON cache keyed by their config, so a rerun prints the tables without training again.
Workers are separate processes with one torch thread each.
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

from samlab.config import RunConfig  # noqa: E402
from samlab.paired import select_then_compare  # noqa: E402

RELU_BASE = {
    "data": {"name": "relu-teacher", "n_train": 60, "n_test": 2000, "n_features": 10, "sparsity": 2},
    "model": {"name": "relu-net", "width": 40, "init_scale": 0.01},
    "optim": {"method": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
    "schedule": {"name": "constant"}, "epochs": 4000, "batch_size": 60, "device": "cpu",
    "checkpoint_every": 0, "eval_every": 4000, "log_every": 4000,
}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of `base` with dotted-key changes ("optim.lr": 0.1 spelled optim__lr=0.1)."""
    raw = json.loads(json.dumps(base))
    for key, value in changes.items():
        *path, last = key.split("__")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


# name -> (base config, ms with the batch size first, {m: ρ grid}, extra methods)
CANDIDATES: dict[str, dict[str, Any]] = {
    "relu-teacher": {
        "base": RELU_BASE,
        "ms": [60, 20, 6, 2],
        "rhos": {60: [0.0005, 0.001, 0.002, 0.004], 20: [0.0005, 0.001, 0.002, 0.004],
                 6: [0.0005, 0.001, 0.002, 0.004], 2: [0.0005, 0.001, 0.002, 0.004]},
        "methods": ["sgd"],
    },
    "relu-teacher-noisy": {
        "base": _with(RELU_BASE, data__noise_std=0.3),
        "ms": [60, 20, 6, 2],
        "rhos": {m: [0.0005, 0.001, 0.002, 0.004] for m in (60, 20, 6, 2)},
        "methods": ["sgd"],
    },
}


def run_configs(candidate: dict[str, Any], seeds: list[int]) -> list[tuple[str, int, float, int, RunConfig]]:
    """(method, m, ρ, seed, config) for every run of a candidate; sgd runs once per seed with ρ = 0."""
    base = candidate["base"]
    batch = base["batch_size"]
    runs = []
    for seed in seeds:
        if "sgd" in candidate["methods"]:
            runs.append(("sgd", batch, 0.0, seed, RunConfig.from_dict(_with(base, seed=seed))))
        for m in candidate["ms"]:
            for rho in candidate["rhos"][m]:
                method = "sam" if m == batch else "msam"
                raw = _with(base, seed=seed, optim__method=method, optim__rho=rho,
                            optim__m=None if m == batch else m)
                runs.append((method, m, rho, seed, RunConfig.from_dict(raw)))
        if "nsam" in candidate["methods"]:
            for rho in candidate["rhos"][batch]:
                raw = _with(base, seed=seed, optim__method="nsam", optim__rho=rho)
                runs.append(("nsam", batch, rho, seed, RunConfig.from_dict(raw)))
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


def score(record: dict[str, Any], task_is_regression: bool) -> float:
    """Higher is better: −test loss (regression) or test accuracy in points."""
    if record["status"] != "completed":
        return -math.inf
    if task_is_regression:
        return -record["test_loss"]
    return 100.0 * record["test_acc"]


def train_all(configs: list[RunConfig], cache: dict[str, Any], workers: int, cache_path: Path) -> None:
    todo = [c.to_json() for c in configs if c.to_json() not in cache]
    if not todo:
        return
    print(f"training {len(todo)} runs on {workers} workers ...", file=sys.stderr)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done, (key, record) in enumerate(zip(todo, pool.map(_train, todo), strict=True), start=1):
            cache[key] = record
            if done % 10 == 0 or done == len(todo):
                cache_path.write_text(json.dumps(cache))
                print(f"  {done}/{len(todo)}", file=sys.stderr)


def table(name: str, candidate: dict[str, Any], cache: dict[str, Any], select: list[int],
          evaluate: list[int]) -> list[dict[str, Any]]:
    """One row per method / m: ρ chosen on `select`, paired difference vs SAM on `evaluate`."""
    regression = candidate["base"]["data"]["name"] in ("relu-teacher", "sparse-regression")
    scores: dict[str, dict[float, dict[int, float]]] = {}
    seconds = 0.0
    for method, m, rho, seed, cfg in run_configs(candidate, select + evaluate):
        record = cache.get(cfg.to_json())
        if record is None:
            continue
        seconds += record["seconds"]
        key = method if method in ("sgd", "nsam") else f"m={m}"
        scores.setdefault(key, {}).setdefault(rho, {})[seed] = score(record, regression)
    batch = candidate["base"]["batch_size"]
    rows = select_then_compare(scores, f"m={batch}", select, evaluate)
    out = []
    for key, row in rows.items():
        values = [v for v in scores[key][row["rho"]].values() if math.isfinite(v)]
        out.append({"candidate": name, "cell": key, **row, "score_mean": sum(values) / max(len(values), 1)})
    print(f"\n{name}: ρ chosen on seeds {select}, paired vs SAM (m={batch}) on seeds {evaluate}; "
          f"{'score = −test MSE' if regression else 'score = test accuracy (points)'}; "
          f"{seconds:.0f} s of training in all")
    print(f"{'cell':>8} {'ρ':>8} {'score':>10} {'Δ vs SAM':>11} {'± SE':>9} {'z':>6} {'n':>3} {'wins':>5}")
    for r in out:
        print(f"{r['cell']:>8} {r['rho']:>8g} {r['score_mean']:>10.5g} {r['mean']:>+11.4g} {r['se']:>9.2g} "
              f"{r['z']:>6.2f} {r['n']:>3} {r['n_positive']:>5}")
    return out


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
        configs = [c for *_, c in run_configs(candidate, args.select + args.eval)]
        train_all(configs, cache, args.workers, cache_path)
        rows += table(name, candidate, cache, args.select, args.eval)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
