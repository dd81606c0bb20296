"""Cost of one loss-landscape grid point against one eval forward over the same data.

A grid point needs at least one forward pass of the model over the data, so the floor of
`samlab.landscape.PointEvaluator` is one plain eval forward (`model(x)` under no_grad, batch by
batch). Both run in one process on the same model and data, interleaved repeat by repeat; each
figure is the median over repeats of the time per point (a chunk of points per call, divided by the
number of points) and of the time of one forward. Prints the ratio point / forward per workload:

- digits-cnn: the digits CNN (width 16, BatchNorm, eval mode) on 1797 digits (8x8) in batches of 256
- digits-mlp: the MLP 64-64-64-10 on the same data
- cifar-wrn16: WideResNet-16-1 on 512 random CIFAR-shaped images in batches of 256

    python benchmarks/landscape_point_cost.py [--json] [--repeats N] [--points P] [--threads T]
                                              [--clock wall|cpu] [--device cpu|cuda] [--workloads a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from samlab import landscape as L
from samlab.config import DataConfig, ModelConfig
from samlab.data import load_dataset
from samlab.losses import cross_entropy_per_sample
from samlab.models import build_model

GOAL = 1.15
BATCH = 256
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def workload(name: str, device: torch.device, seed: int):
    """(eval-mode model, list of (x, y) batches)."""
    if name.startswith("digits"):
        data = load_dataset(DataConfig(name="digits"), device=device)
        x, y = data.x_train, data.y_train
        cfg = ModelConfig(name="cnn", width=16) if name == "digits-cnn" else ModelConfig(name="mlp", width=64, depth=2)
        model = build_model(cfg, data.input_shape, data.num_classes, seed=seed, device=device)
    else:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(512, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (512,), generator=gen).to(device)
        model = build_model(ModelConfig(name="wrn16", widen=1), (3, 32, 32), 10, seed=seed, device=device)
    with torch.no_grad():  # running statistics of real batches instead of the (0, 1) defaults
        model.train()
        model(x[:BATCH])
    return model.eval(), [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]


def measure(name: str, device: torch.device, points: int, repeats: int, seed: int, clock: str) -> dict:
    model, batches = workload(name, device, seed)
    d1, d2 = L.random_directions(model, 2, seed=seed)
    evaluator = L.PointEvaluator(model, cross_entropy_per_sample, batches, [d1, d2])
    coords = np.stack(np.meshgrid(np.linspace(-1, 1, points), [0.5], indexing="ij"), -1).reshape(-1, 2)
    tick = CLOCKS[clock]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward() -> float:
        sync()
        t0 = tick()
        with torch.no_grad():
            for x, _ in batches:
                model(x)
        sync()
        return tick() - t0

    def grid_points() -> float:
        sync()
        t0 = tick()
        evaluator(coords)
        sync()
        return (tick() - t0) / len(coords)

    forward(), grid_points()  # warm-up
    samples = {"forward": [], "point": []}
    for _ in range(repeats):
        samples["forward"].append(forward())
        samples["point"].append(grid_points())
    ms = {key: 1e3 * statistics.median(values) for key, values in samples.items()}
    return {"forward_ms": ms["forward"], "point_ms": ms["point"], "ratio": ms["point"] / ms["forward"],
            "n_samples": sum(len(y) for _, y in batches), "points_per_call": len(coords)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--points", type=int, default=8, help="grid points per evaluator call")
    parser.add_argument("--workloads", default="digits-cnn,digits-mlp,cifar-wrn16")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu: CPU time does not measure GPU work; use --clock wall with --device cuda")
    if args.repeats < 1 or args.points < 1:
        parser.error("--repeats and --points: must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = {name: measure(name, torch.device(args.device), args.points, args.repeats, args.seed, args.clock)
               for name in args.workloads.split(",")}
    out = {"device": args.device, "threads": torch.get_num_threads(), "clock": args.clock, "repeats": args.repeats,
           "load_before": load_before, "load_after": os.getloadavg(), "goal": GOAL, "workloads": results}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"device {args.device}, {out['threads']} threads, {args.clock} clock, median of {args.repeats}; load "
          f"{'/'.join(f'{v:.1f}' for v in load_before)} -> {'/'.join(f'{v:.1f}' for v in out['load_after'])}")
    for name, r in results.items():
        verdict = "met" if r["ratio"] <= GOAL else "MISSED"
        print(f"  {name:<12} forward {r['forward_ms']:8.2f} ms  point {r['point_ms']:8.2f} ms  "
              f"point/forward {r['ratio']:5.2f}  (goal <= {GOAL}: {verdict})")


if __name__ == "__main__":
    main()
