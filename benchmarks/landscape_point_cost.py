"""Cost of one loss-landscape grid point against one eval forward over the same data.

A grid point needs at least one forward pass of the model over the data, so the floor of
`samlab.landscape.PointEvaluator` is one plain eval forward (`model(x)` under no_grad, batch by
batch). Both run in one process on the same model and data, interleaved repeat by repeat; each
figure is the median over repeats of the time per point (a chunk of P points per call, divided by P)
and of the time of one forward. Prints the ratio point / forward per workload and evaluator `impl`
("sequential": point after point in the model's own tensors; "copies": all P points in one pass per
batch) and which one impl="auto" picks. Workloads, every built-in model (eval mode, BatchNorm
statistics from one training-mode batch):

- digits-mlp, digits-mlp-256: the MLP 64-64-64-10 / 64-256-256-10 on 1797 digits (8x8) in batches of 256
- digits-cnn, digits-cnn-gn: the digits CNN (width 16) with BatchNorm / GroupNorm on the same data
- cifar-wrn16: WideResNet-16-1 on 512 random CIFAR-shaped images in batches of 256
- cifar-resnet18: ResNet-18 of width 8 on the same images
- diag-linear: the diagonal linear network on 1797 random 30-feature vectors (regression)
- relu-net: the relu-msharp preset's two-layer ReLU network (width 40) on 1797 random 10-feature vectors

The C allocator is set as in a run's worker process, where landscape analyses run
(`samlab.devices.retain_freed_memory`); `--allocator default` measures with glibc's own settings.

    python benchmarks/landscape_point_cost.py [--json] [--repeats N] [--points P] [--threads T]
                                              [--clock wall|cpu] [--device cpu|cuda] [--workloads a,b]
                                              [--impls sequential,copies]
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
from samlab.devices import retain_freed_memory
from samlab.losses import per_sample_loss
from samlab.models import build_model

GOAL = 1.15
BATCH = 256
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


WORKLOADS = {
    "digits-mlp": ModelConfig(name="mlp", width=64, depth=2),
    "digits-mlp-256": ModelConfig(name="mlp", width=256, depth=2),
    "digits-cnn": ModelConfig(name="cnn", width=16, norm="bn"),
    "digits-cnn-gn": ModelConfig(name="cnn", width=16, norm="gn"),
    "cifar-wrn16": ModelConfig(name="wrn16", widen=1, norm="bn"),
    "cifar-resnet18": ModelConfig(name="resnet18", width=8, norm="bn"),
    "diag-linear": ModelConfig(name="diag-linear"),
    "relu-net": ModelConfig(name="relu-net", width=40, init_scale=0.01),
}
VECTOR_FEATURES = {"diag-linear": 30, "relu-net": 10}  # the workloads on random vectors: their input size


def workload(name: str, device: torch.device, seed: int):
    """(eval-mode model, list of (x, y) batches, task)."""
    gen = torch.Generator().manual_seed(seed)
    if name.startswith("digits"):
        data = load_dataset(DataConfig(name="digits"), device=device)
        x, y, shape, outputs = data.x_train, data.y_train, data.input_shape, data.num_classes
    elif name in VECTOR_FEATURES:
        features = VECTOR_FEATURES[name]
        x, shape, outputs = torch.randn(1797, features, generator=gen).to(device), (features,), 1
        y = torch.randn(1797, generator=gen).to(device)
    else:
        x, shape, outputs = torch.randn(512, 3, 32, 32, generator=gen).to(device), (3, 32, 32), 10
        y = torch.randint(0, 10, (512,), generator=gen).to(device)
    model = build_model(WORKLOADS[name], shape, outputs, seed=seed, device=device)
    with torch.no_grad():  # running statistics of real batches instead of the (0, 1) defaults
        model.train()
        model(x[:BATCH])
    task = "regression" if outputs == 1 else "classification"
    return model.eval(), [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)], task


def measure(name: str, device: torch.device, points: int, repeats: int, seed: int, clock: str,
            impls: list[str]) -> dict:
    model, batches, task = workload(name, device, seed)
    # the vector models' one-dimensional tensors are weights, not biases
    d1, d2 = L.random_directions(model, 2, seed=seed, ignore="none" if name in VECTOR_FEATURES else "biasbn")
    evaluators = {impl: L.PointEvaluator(model, per_sample_loss(task), batches, [d1, d2], impl=impl)
                  for impl in impls}
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

    def grid_points(evaluator) -> float:
        sync()
        t0 = tick()
        evaluator(coords)
        sync()
        return (tick() - t0) / len(coords)

    forward()  # warm-up
    for evaluator in evaluators.values():
        grid_points(evaluator)
    samples = {key: [] for key in ("forward", *impls)}
    for _ in range(repeats):
        samples["forward"].append(forward())
        for impl, evaluator in evaluators.items():
            samples[impl].append(grid_points(evaluator))
    ms = {key: 1e3 * statistics.median(values) for key, values in samples.items()}
    auto = L.PointEvaluator(model, per_sample_loss(task), batches, [d1, d2]).impl
    return {"forward_ms": ms["forward"], "point_ms": {impl: ms[impl] for impl in impls},
            "ratio": {impl: ms[impl] / ms["forward"] for impl in impls}, "auto": auto,
            "n_samples": sum(len(y) for _, y in batches), "points_per_call": len(coords)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--points", type=int, default=32, help="grid points per evaluator call")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--impls", default="sequential,copies", help="PointEvaluator impls to time")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allocator", default="worker", choices=("worker", "default"),
                        help="worker: the C allocator kept as a run's worker keeps it (samlab.devices."
                             "retain_freed_memory); default: glibc's own settings")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu: CPU time does not measure GPU work; use --clock wall with --device cuda")
    if args.repeats < 1 or args.points < 1:
        parser.error("--repeats and --points: must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.allocator == "worker":
        retain_freed_memory()
    load_before = os.getloadavg()
    impls = args.impls.split(",")
    if unknown := [i for i in impls if i not in L.POINT_IMPLS[1:]] + [w for w in args.workloads.split(",")
                                                                       if w not in WORKLOADS]:
        parser.error(f"--impls/--workloads: unknown {unknown}")
    results = {name: measure(name, torch.device(args.device), args.points, args.repeats, args.seed, args.clock, impls)
               for name in args.workloads.split(",")}
    out = {"device": args.device, "threads": torch.get_num_threads(), "clock": args.clock, "repeats": args.repeats,
           "allocator": args.allocator,
           "load_before": load_before, "load_after": os.getloadavg(), "goal": GOAL, "workloads": results}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"device {args.device}, {out['threads']} threads, {args.clock} clock, {args.allocator} allocator, "
          f"median of {args.repeats}; load "
          f"{'/'.join(f'{v:.1f}' for v in load_before)} -> {'/'.join(f'{v:.1f}' for v in out['load_after'])}")
    print(f"  {args.points} points per call; ratio = time per point / one forward; * = impl='auto'")
    print(f"  {'workload':<15} {'forward ms':>10}  " + "  ".join(f"{impl:>12}" for impl in impls)
          + f"  auto   goal <= {GOAL}")
    for name, r in results.items():
        cells = "  ".join(f"{r['ratio'][impl]:11.2f}{'*' if impl == r['auto'] else ' '}" for impl in impls)
        verdict = ("met" if r["ratio"][r["auto"]] <= GOAL else "MISSED") if r["auto"] in r["ratio"] else "-"
        print(f"  {name:<15} {r['forward_ms']:10.2f}  {cells}  {r['auto']:<6} {verdict}")


if __name__ == "__main__":
    main()
