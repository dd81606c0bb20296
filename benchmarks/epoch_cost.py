"""One cifar10-resnet18 training epoch per method, on synthetic data in CIFAR-10's on-disk format.

    python benchmarks/epoch_cost.py [--device cuda] [--precision bf16] [--epochs 2] [--train-samples 50000]
                                    [--width 64] [--batch 128] [--methods sgd,sam,msam4,msam16,rwsam] [--json]

Writes a CIFAR-10 folder of random images (the real pickled batches, read by samlab's own reader) into a
temporary directory, then trains the `cifar10-resnet18` preset on it through `samlab.train.run` — the
same loop, model, augmentation, precision and optimizer code a run of the dashboard uses — once per
method, for --epochs epochs, and prints the last epoch's training time (`epoch_time`, without the
evaluation) with its ratio to SGD and to SAM. Methods: sgd, sam (ρ 0.05), msam4 / msam16 (m-SAM with
k = 4 / 16 micro-batches of the batch: m = batch / k), rwsam. The first epoch includes the device's
warm-up (kernel selection, allocator growth), so the default is two and the second is reported.

Meant for a GPU (`--device cuda`, bf16, the preset's full width and 50 000 samples: a few minutes); on a
CPU, shrink it (e.g. `--device cpu --precision fp32 --train-samples 512 --width 8 --epochs 1`).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from samlab.config import preset
from samlab.reporting import RecordingReporter
from samlab.train import run

METHODS = {
    "sgd": {"optim.method": "sgd"},
    "sam": {"optim.method": "sam"},
    "msam4": {"optim.method": "msam", "k": 4},
    "msam16": {"optim.method": "msam", "k": 16},
    "rwsam": {"optim.method": "rwsam"},
}


def write_cifar10(root: Path, train: int, test: int, seed: int = 0) -> None:
    """A CIFAR-10 folder of random uint8 images and labels in the original pickled layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [len(part) for part in np.array_split(np.arange(train), 5)]
    for name, n in [*((f"data_batch_{i + 1}", s) for i, s in enumerate(sizes)), ("test_batch", test)]:
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"filenames": [b"%d.png" % i for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def epoch_seconds(method: str, root: Path, args: argparse.Namespace, workdir: Path) -> float:
    overrides = {key: value for key, value in METHODS[method].items() if key != "k"}
    if "k" in METHODS[method]:
        overrides["optim.m"] = args.batch // METHODS[method]["k"]
    overrides.update({"epochs": args.epochs, "device": args.device, "precision": args.precision,
                      "batch_size": args.batch, "model.width": args.width, "data.root": str(root),
                      "data.n_test": args.test_samples, "seed": 0, "checkpoint_every": 0})
    reporter = RecordingReporter()
    result = run(preset("cifar10-resnet18", overrides), reporter, workdir=workdir)
    if result.status != "completed":
        raise RuntimeError(f"{method}: the run ended {result.status}")
    times = [values["epoch_time"] for kind, _, values in reporter.rows if kind == "epoch" and "epoch_time" in values]
    return float(times[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=50_000)
    parser.add_argument("--test-samples", type=int, default=1_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    for method in methods:
        if method not in METHODS:
            parser.error(f"--methods: {method!r} is not one of {', '.join(METHODS)}")
    if args.epochs < 1 or args.train_samples < args.batch or args.test_samples < 1:
        parser.error("need --epochs >= 1, --train-samples >= --batch, --test-samples >= 1")
    if any("k" in METHODS[m] and args.batch % METHODS[m]["k"] for m in methods):
        parser.error("--batch: must be divisible by 16 for msam16 (and 4 for msam4)")
    with tempfile.TemporaryDirectory(prefix="samlab-epoch-") as tmp:
        root = Path(tmp)
        write_cifar10(root / "data", args.train_samples, args.test_samples)
        seconds = {}
        for method in methods:
            seconds[method] = epoch_seconds(method, root / "data", args, root / method)
            print(f"  {method:8s} {seconds[method]:8.2f} s per epoch", file=sys.stderr, flush=True)
    result = {"device": args.device, "precision": args.precision, "train_samples": args.train_samples,
              "width": args.width, "batch": args.batch, "epoch_seconds": seconds,
              "over_sgd": {m: s / seconds["sgd"] for m, s in seconds.items()} if "sgd" in seconds else {},
              "over_sam": {m: s / seconds["sam"] for m, s in seconds.items()} if "sam" in seconds else {}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"cifar10-resnet18 (width {args.width}), {args.train_samples} synthetic samples, batch {args.batch}, "
              f"{args.precision} on {args.device}; epoch {args.epochs} of {args.epochs}")
        for method, s in seconds.items():
            ratios = "  ".join(f"/{base} {result[f'over_{base}'][method]:.2f}" for base in ("sgd", "sam")
                               if method in result[f"over_{base}"])
            print(f"{method:8s} {s:8.2f} s  {args.train_samples / s:8.0f} samples/s  {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
