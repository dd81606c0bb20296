"""2-D loss surface: samlab's vmapped chunks against the `loss-landscapes` package, same directions.

    python benchmarks/landscape_vs_loss_landscapes.py [--grid 41] [--n-samples N] [--repeats 3] [--json]

Setup "digits-cnn" (default): the digits CNN (width 16) after one short epoch of SGD, on the digits
train set; "cifar-resnet18": ResNet-18 at initialization on random CIFAR-shaped data (for a GPU).
Both libraries get the same filter-normalized directions (samlab.landscape.random_directions): the
package's `planar_interpolation` is handed three models, start = θ − d1 − d2, start + (n·h) d1 and
start + (n·h) d2, so that its steps walk the grid of spacing h = 2/(n − 1). Its loop evaluates row i
at columns 1..n when i is even and 0..n−1 when i is odd (it moves along d2 before evaluating, then
back); samlab's grid gets one extra column so that every value the package computes has its twin,
and the script reports the largest absolute difference. Times are medians over repeats, both
libraries in the same process, alternating repeat by repeat.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch
from loss_landscapes import planar_interpolation
from loss_landscapes.metrics import Loss

from samlab import landscape as L
from samlab.config import DataConfig, ModelConfig
from samlab.data import iterate_batches, load_dataset
from samlab.devices import resolve_device
from samlab.losses import cross_entropy_per_sample
from samlab.models import build_model


def digits_cnn(device: torch.device, n_samples: int | None, seed: int):
    data = load_dataset(DataConfig(name="digits"), device=device)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="cnn", width=16), data.input_shape, data.num_classes).to(device)
    train_briefly(model, data.x_train, data.y_train, seed)
    x, y = data.x_train, data.y_train
    return model.eval(), (x[:n_samples], y[:n_samples]) if n_samples else (x, y)


def cifar_resnet18(device: torch.device, n_samples: int | None, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = n_samples or 256
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="resnet18", width=64), (3, 32, 32), 10).to(device)
    with torch.no_grad():  # running statistics of real batches instead of the (0, 1) defaults
        model.train()
        model(x[:128].to(device))
    return model.eval(), (x.to(device), y.to(device))


def train_briefly(model, x, y, seed: int) -> None:
    """One epoch of plain SGD, so the surface is taken around a point the loss has moved from."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for xb, yb in iterate_batches(x, y, 64, generator=torch.Generator().manual_seed(seed)):
        optimizer.zero_grad()
        cross_entropy_per_sample(model(xb), yb).mean().backward()
        optimizer.step()


def shifted_copy(model, moves):
    """A deep copy of `model` whose parameters are moved by Σ c · d over (c, d) in `moves`."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            for c, d in moves:
                p.add_(c * d[name])
    return clone


def package_surface(model, data, d1, d2, lo: float, h: float, n: int) -> np.ndarray:
    start = shifted_copy(model, [(lo, d1), (lo, d2)])
    end_one = shifted_copy(start, [(n * h, d1)])
    end_two = shifted_copy(start, [(n * h, d2)])
    metric = Loss(lambda out, target: cross_entropy_per_sample(out, target).mean(), *data)
    return planar_interpolation(start, end_one, end_two, metric, steps=n, deepcopy_model=True)


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, value


def interleaved(first, second, repeats: int):
    """Alternate the two (the machine's load drifts): per-repeat times of each, and the last values."""
    times_a, times_b, a, b = [], [], None, None
    for _ in range(repeats):
        ta, a = timed(first)
        tb, b = timed(second)
        times_a.append(ta)
        times_b.append(tb)
    return times_a, times_b, a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", choices=("digits-cnn", "cifar-resnet18"), default="digits-cnn")
    parser.add_argument("--grid", type=int, default=41, help="points per axis (n × n surface on [-1, 1]²)")
    parser.add_argument("--n-samples", type=int, default=None, help="first N samples only (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats of both (medians)")
    parser.add_argument("--max-memory-mb", type=float, default=1024.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    device = resolve_device(args.device)
    build = digits_cnn if args.setup == "digits-cnn" else cifar_resnet18
    model, data = build(device, args.n_samples, args.seed)
    d1, d2 = L.random_directions(model, 2, norm="filter", ignore="biasbn", seed=args.seed)
    n, lo = args.grid, -1.0
    h = 2.0 / (n - 1)
    axis = lo + h * np.arange(n)

    def samlab_surface(ys):
        return L.surface_2d(model, cross_entropy_per_sample, data, d1, d2, axis, ys,
                            max_memory_mb=args.max_memory_mb)

    samlab_surface(axis[:2])  # warm-up: first-call costs of vmap and the allocator
    samlab_times, package_times, _, package = interleaved(
        lambda: samlab_surface(axis), lambda: package_surface(model, data, d1, d2, lo, h, n), args.repeats)
    samlab_s, package_s = statistics.median(samlab_times), statistics.median(package_times)
    twin = samlab_surface(lo + h * np.arange(n + 1)).loss  # one more column: the package's odd offsets
    expected = np.stack([twin[i, 1:] if i % 2 == 0 else twin[i, :-1] for i in range(n)])
    report = {
        "setup": args.setup,
        "device": str(device),
        "grid": [n, n],
        "n_samples": int(data[1].shape[0]),
        "threads": torch.get_num_threads(),
        "chunk_points": L.PointEvaluator(model, cross_entropy_per_sample, data, [d1, d2]).chunk_size(
            args.max_memory_mb),
        "samlab_s": samlab_s,
        "loss_landscapes_s": package_s,
        "speedup": package_s / samlab_s,
        "speedup_per_repeat": [b / a for a, b in zip(samlab_times, package_times)],
        "max_abs_diff": float(np.abs(np.asarray(package, dtype=np.float64) - expected).max()),
        "loss_range": [float(expected.min()), float(expected.max())],
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.setup} on {device}: {n}×{n} surface, {report['n_samples']} samples, "
          f"{report['chunk_points']} points per chunk")
    print(f"  samlab          {samlab_s:8.2f} s (median of {args.repeats}, interleaved)")
    print(f"  loss-landscapes {package_s:8.2f} s (median of {args.repeats}, interleaved)")
    print(f"  speedup         {report['speedup']:8.2f}×")
    print(f"  max |Δ loss|    {report['max_abs_diff']:.2e} (loss from {expected.min():.3f} to {expected.max():.3f})")


if __name__ == "__main__":
    main()
