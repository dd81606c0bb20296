"""Cost of one optimizer step (sharpness_gradient + a base SGD step) on every built-in model, and of
the same SAM step through the `SAM` optimizer class (`sam_step`, whole batch and 4 chunks).

For each model, all configurations run side by side in one process on the same initialisation and
the same batch, interleaved round-robin (every repeat runs each configuration once, in turn) so
that machine-load drift hits them alike; warm-up steps are excluded and each figure is the median
over repeats. Prints one table of ratios against SAM (and SAM against SGD):

    sam/sgd, rwsam/sam, msam {auto, fused, vmap, loop} / sam at k = b/m in {4, 16, 64},
    sam_class/sam, sam_class_acc4/sam_class

and which implementation impl="auto" picked. Models (batch 128): the MLP 64-256-256-10 and the
digits-mlp shape 64-64-64-10 on 8x8 inputs, the digits CNN (width 16) with BatchNorm and with
GroupNorm on 8x8, WideResNet-16-1 and ResNet-18 of width 8 on 3x32x32 (BatchNorm), the
diagonal linear network on 30 features and the two-layer ReLU network of the relu-msharp preset
(width 40 on 10 features). --device cuda runs the same models on the GPU plus
ResNet-18 at its standard width 64.

    python benchmarks/step_cost.py [--json] [--repeats N] [--device cpu|cuda] [--threads T]
                                   [--clock wall|cpu] [--models a,b] [--impls auto,vmap,loop] [--ks 4,16,64]
                                   [--allocator worker|default]

The C allocator is set as in a run's worker process (`samlab.devices.retain_freed_memory`: freed
memory kept for the next step instead of page-faulted in again); `--allocator default` measures
with glibc's own settings.

On a CPU shared with other jobs, `--threads 1 --clock cpu` measures the work of each step
rather than the time spent waiting for a core.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch

from samlab.config import IMPLS, ModelConfig
from samlab.devices import retain_freed_memory
from samlab.losses import per_sample_loss
from samlab.models import build_model
from samlab.optim import SAM, sam_step, sharpness_gradient
from samlab.optim.sharpness import choose_impl

MICRO_BATCH_COUNTS = (4, 16, 64)
GOALS = {"msam_auto_k16": 1.3, "msam_auto_k64": 1.5}
# label -> (model config, per-sample input shape, outputs); outputs 1 is a regression
MODELS = {
    "mlp-256": (ModelConfig(name="mlp", width=256, depth=2), (1, 8, 8), 10),
    "mlp-64": (ModelConfig(name="mlp", width=64, depth=2), (1, 8, 8), 10),
    "cnn-bn": (ModelConfig(name="cnn", width=16, norm="bn"), (1, 8, 8), 10),
    "cnn-gn": (ModelConfig(name="cnn", width=16, norm="gn"), (1, 8, 8), 10),
    "wrn16-1": (ModelConfig(name="wrn16", widen=1, norm="bn"), (3, 32, 32), 10),
    "resnet18-8": (ModelConfig(name="resnet18", width=8, norm="bn"), (3, 32, 32), 10),
    "diag-linear": (ModelConfig(name="diag-linear"), (30,), 1),
    "relu-net": (ModelConfig(name="relu-net", width=40, init_scale=0.01), (10,), 1),
}
CUDA_MODELS = {"resnet18-64": (ModelConfig(name="resnet18", width=64, norm="bn"), (3, 32, 32), 10)}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def workload(label: str, device: torch.device, batch: int, seed: int):
    """(model, x, y, loss_fn) for one model of MODELS / CUDA_MODELS."""
    cfg, shape, outputs = {**MODELS, **CUDA_MODELS}[label]
    gen = torch.Generator().manual_seed(seed)
    model = build_model(cfg, shape, outputs, seed=seed, device=device).train()
    x = torch.randn(batch, *shape, generator=gen).to(device)
    if outputs == 1:
        return model, x, torch.randn(batch, generator=gen).to(device), per_sample_loss("regression")
    y = torch.randint(0, outputs, (batch,), generator=gen).to(device)
    return model, x, y, per_sample_loss("classification")


def configurations(batch: int, impls: list[str], ks: list[int]) -> dict[str, dict]:
    """Label -> sharpness_gradient keyword arguments."""
    configs = {"sgd": {"method": "sgd"}, "sam": {"method": "sam"},
               "rwsam": {"method": "rwsam", "lam": 1.0, "estimator": "fd"}}
    for impl in impls:
        for k in ks:
            configs[f"msam_{impl}_k{k}"] = {"method": "msam", "m": batch // k, "impl": impl}
    return configs


# Steps through the SAM class: label -> sam_step keyword arguments.
CLASS_CONFIGS = {"sam_class": {"accumulate": 1}, "sam_class_acc4": {"accumulate": 4}}


def make_class_stepper(model, x, y, loss_fn, kwargs):
    """One SAM step through the optimizer class (BatchNorm statistics restored), on its own model copy."""
    model = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.01, momentum=0.9)
    return lambda: sam_step(opt, model, loss_fn, x, y, **kwargs)


def make_stepper(model, x, y, loss_fn, kwargs, device, seed):
    """A closure running one full optimizer step on its own copy of the model."""
    model = copy.deepcopy(model)
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator(device=device).manual_seed(seed)

    def step() -> None:
        sharpness_gradient(model, loss_fn, x, y, rho=0.05, generator=generator, **kwargs)
        base.step()
        base.zero_grad(set_to_none=True)

    return step


def time_steps(step, device: torch.device, inner: int, clock) -> float:
    """Seconds per step, averaged over `inner` consecutive steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    for _ in range(inner):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (clock() - t0) / inner


def measure_model(label: str, device: torch.device, batch: int, repeats: int, warmup: int, seed: int,
                  clock: str, impls: list[str], ks: list[int], min_sample_s: float) -> dict:
    model, x, y, loss_fn = workload(label, device, batch, seed)
    steppers = {name: make_stepper(model, x, y, loss_fn, kw, device, seed)
                for name, kw in configurations(batch, impls, ks).items()}
    steppers.update({name: make_class_stepper(model, x, y, loss_fn, kw) for name, kw in CLASS_CONFIGS.items()})
    for step in steppers.values():
        for _ in range(warmup):
            step()
    # enough consecutive steps per sample that the clock's resolution does not matter
    inner = max(1, math.ceil(min_sample_s / max(time_steps(steppers["sam"], device, 1, CLOCKS[clock]), 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, step in steppers.items():
            samples[name].append(time_steps(step, device, inner, CLOCKS[clock]))
    median_ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
    return {"median_ms": median_ms, "ratios": ratios(median_ms, impls, ks), "inner_steps": inner,
            "auto_picks": choose_impl(model)}


def ratios(ms: dict[str, float], impls: list[str], ks: list[int]) -> dict[str, float]:
    out = {"sam/sgd": ms["sam"] / ms["sgd"], "rwsam/sam": ms["rwsam"] / ms["sam"]}
    for impl in impls:
        for k in ks:
            out[f"msam_{impl}_k{k}"] = ms[f"msam_{impl}_k{k}"] / ms["sam"]
    out["sam_class/sam"] = ms["sam_class"] / ms["sam"]
    out["sam_class_acc4/sam_class"] = ms["sam_class_acc4"] / ms["sam_class"]
    return out


def measure(device: torch.device, labels: list[str], impls: list[str], ks: list[int], batch: int, repeats: int,
            warmup: int, seed: int, clock: str = "wall", min_sample_s: float = 0.05) -> dict:
    load_before = os.getloadavg()
    models = {}
    for label in labels:
        models[label] = measure_model(label, device, batch, repeats, warmup, seed, clock, impls, ks, min_sample_s)
        print(f"  measured {label}", file=sys.stderr, flush=True)
    return {"device": str(device), "batch": batch, "repeats": repeats, "threads": torch.get_num_threads(),
            "clock": clock, "impls": impls, "load_before": load_before, "load_after": os.getloadavg(),
            "models": models, "goals": GOALS}


def print_report(result: dict) -> None:
    print(f"batch {result['batch']}, device {result['device']}, {result['threads']} threads, {result['clock']} clock, "
          f"{result.get('allocator', 'default')} allocator, "
          f"median of {result['repeats']} interleaved repeats; load average before "
          f"{'/'.join(f'{v:.1f}' for v in result['load_before'])}, after "
          f"{'/'.join(f'{v:.1f}' for v in result['load_after'])}")
    columns = list(next(iter(result["models"].values()))["ratios"])
    print(f"{'model':<12} {'sam ms':>8} {'auto':>6} " + " ".join(f"{c.replace('msam_', ''):>10}" for c in columns))
    for label, row in result["models"].items():
        cells = " ".join(f"{row['ratios'][c]:>10.2f}" for c in columns)
        print(f"{label:<12} {row['median_ms']['sam']:>8.2f} {row['auto_picks']:>6} {cells}")
    for goal, limit in result["goals"].items():
        if goal not in columns:
            continue
        missed = [label for label, row in result["models"].items() if row["ratios"][goal] > limit]
        print(f"goal {goal} <= {limit}: {'met on every model' if not missed else 'MISSED on ' + ', '.join(missed)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-sample", type=float, default=0.05, help="seconds of steps per timed sample")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)} "
                                                       f"(cuda also {', '.join(CUDA_MODELS)})")
    parser.add_argument("--impls", default="auto,vmap,loop", help=f"m-SAM implementations, from {', '.join(IMPLS)}")
    parser.add_argument("--ks", default=",".join(map(str, MICRO_BATCH_COUNTS)),
                        help="micro-batch counts k = b/m (each must divide the batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall time, or process CPU time (robust on a shared CPU; with --threads 1)")
    parser.add_argument("--allocator", default="worker", choices=("worker", "default"),
                        help="worker: the C allocator kept as a run's worker keeps it (samlab.devices."
                             "retain_freed_memory); default: glibc's own settings")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1")
    ks = [int(k) for k in args.ks.split(",")]
    if any(k < 1 or args.batch % k for k in ks):
        parser.error(f"--ks: each k must divide the batch of {args.batch} (got {args.ks})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu: CPU time does not measure GPU work; use --clock wall with --device cuda")
    available = {**MODELS, **CUDA_MODELS} if args.device == "cuda" else MODELS
    labels = list(available) if args.models is None else args.models.split(",")
    impls = args.impls.split(",")
    for label in labels:
        if label not in available:
            parser.error(f"--models: {label!r} is not one of {', '.join(available)}")
    for impl in impls:
        if impl not in IMPLS:
            parser.error(f"--impls: {impl!r} is not one of {', '.join(IMPLS)}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads: must be >= 1")
        torch.set_num_threads(args.threads)
    if args.allocator == "worker":
        retain_freed_memory()
    result = measure(torch.device(args.device), labels, impls, ks, args.batch, args.repeats, max(args.warmup, 0),
                     args.seed, args.clock, args.min_sample)
    result["allocator"] = args.allocator
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)


if __name__ == "__main__":
    main()
