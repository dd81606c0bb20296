"""Cost of one optimizer step (sharpness_gradient + a base SGD step) for every SAM-family method,
and of the same SAM step through the `SAM` optimizer class (`sam_step`, whole batch and 4 chunks).

All methods run side by side in one process on the same model initialisation and the same batch,
interleaved round-robin so that machine-load drift hits every method alike; warm-up steps are
excluded and each figure is the median over repeats. Prints the ratios against SAM / SGD:

    sam_over_sgd, msam_vmap_over_sam_k{4,16,64}, msam_loop_over_sam_k{4,16,64}, rwsam_over_sam,
    sam_class_over_sam, sam_class_acc4_over_sam_class

(k = b / m micro-batches). Workloads: the digits CNN (8x8 grayscale, 10 classes) at batch 128 on
CPU; ResNet-18 on CIFAR-shaped batches of 128 with --device cuda.

    python benchmarks/step_cost.py [--json] [--repeats N] [--device cpu|cuda] [--threads T] [--clock wall|cpu]

On a CPU shared with other jobs, `--threads 1 --clock cpu` measures the work of each step
rather than the time spent waiting for a core.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from samlab.config import ModelConfig
from samlab.losses import per_sample_loss
from samlab.models import build_model
from samlab.optim import SAM, sam_step, sharpness_gradient

MICRO_BATCH_COUNTS = (4, 16, 64)
GOALS = {"sam_over_sgd": 2.1, "msam_vmap_over_sam_k16": 1.3, "rwsam_over_sam": 1.25}


def workload(device: torch.device, batch: int, seed: int):
    """(model, x, y, x_independent, y_independent, description) for the device's workload."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        shape, cfg, name = (3, 32, 32), ModelConfig(name="resnet18", width=64, norm="bn"), "resnet18 (bn) on 3x32x32"
    else:
        shape, cfg, name = (1, 8, 8), ModelConfig(name="cnn", width=16), "digits cnn (width 16, bn) on 1x8x8"
    model = build_model(cfg, shape, 10).to(device).train()
    x = torch.randn(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    x_n = torch.randn(4 * batch, *shape, generator=gen).to(device)
    y_n = torch.randint(0, 10, (4 * batch,), generator=gen).to(device)
    return model, x, y, (x_n, y_n), name


def configurations(batch: int, perturb_batch) -> dict[str, dict]:
    """Label -> sharpness_gradient keyword arguments."""
    configs = {
        "sgd": {"method": "sgd"},
        "sam": {"method": "sam"},
        "asam": {"method": "asam"},
        "usam": {"method": "usam"},
        "nsam": {"method": "nsam", "perturb_batch": perturb_batch},
        "rwsam": {"method": "rwsam", "lam": 1.0, "estimator": "fd"},
    }
    for k in MICRO_BATCH_COUNTS:
        for impl in ("vmap", "loop"):
            configs[f"msam_{impl}_k{k}"] = {"method": "msam", "m": batch // k, "impl": impl}
    return configs


# Steps through the SAM class: label -> sam_step keyword arguments.
CLASS_CONFIGS = {"sam_class": {"accumulate": 1}, "sam_class_acc4": {"accumulate": 4}}


def make_class_stepper(model, x, y, kwargs):
    """One SAM step through the optimizer class (BatchNorm statistics restored), on its own model copy."""
    model = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.01, momentum=0.9)
    loss_fn = per_sample_loss("classification")
    return lambda: sam_step(opt, model, loss_fn, x, y, **kwargs)


def make_stepper(model, x, y, kwargs, device, seed):
    """A closure running one full optimizer step on its own copy of the model."""
    model = copy.deepcopy(model)
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = per_sample_loss("classification")
    generator = torch.Generator(device=device).manual_seed(seed)

    def step() -> None:
        sharpness_gradient(model, loss_fn, x, y, rho=0.05, generator=generator, **kwargs)
        base.step()
        base.zero_grad(set_to_none=True)

    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


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


def measure(device: torch.device, batch: int, repeats: int, warmup: int, inner: int, seed: int,
            clock: str = "wall") -> dict:
    model, x, y, perturb_batch, name = workload(device, batch, seed)
    steppers = {label: make_stepper(model, x, y, kw, device, seed)
                for label, kw in configurations(batch, perturb_batch).items()}
    steppers.update({label: make_class_stepper(model, x, y, kw) for label, kw in CLASS_CONFIGS.items()})
    for step in steppers.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {label: [] for label in steppers}
    for _ in range(repeats):
        for label, step in steppers.items():
            samples[label].append(time_steps(step, device, inner, CLOCKS[clock]))
    median_ms = {label: 1e3 * statistics.median(values) for label, values in samples.items()}
    return {
        "device": str(device),
        "workload": name,
        "batch": batch,
        "repeats": repeats,
        "inner_steps": inner,
        "threads": torch.get_num_threads(),
        "clock": clock,
        "median_ms": median_ms,
        "ratios": ratios(median_ms),
        "goals": GOALS,
    }


def ratios(ms: dict[str, float]) -> dict[str, float]:
    out = {"sam_over_sgd": ms["sam"] / ms["sgd"]}
    for k in MICRO_BATCH_COUNTS:
        out[f"msam_vmap_over_sam_k{k}"] = ms[f"msam_vmap_k{k}"] / ms["sam"]
    for k in MICRO_BATCH_COUNTS:
        out[f"msam_loop_over_sam_k{k}"] = ms[f"msam_loop_k{k}"] / ms["sam"]
    out["rwsam_over_sam"] = ms["rwsam"] / ms["sam"]
    for method in ("asam", "usam", "nsam"):
        out[f"{method}_over_sam"] = ms[method] / ms["sam"]
    out["sam_class_over_sam"] = ms["sam_class"] / ms["sam"]
    out["sam_class_acc4_over_sam_class"] = ms["sam_class_acc4"] / ms["sam_class"]
    return out


def print_report(result: dict) -> None:
    print(f"{result['workload']}, batch {result['batch']}, device {result['device']}, "
          f"{result['threads']} threads, {result['clock']} clock, median of {result['repeats']} x {result['inner_steps']} steps")
    for label, ms in result["median_ms"].items():
        print(f"  {label:<18} {ms:9.2f} ms/step")
    for label, value in result["ratios"].items():
        goal = result["goals"].get(label)
        verdict = "" if goal is None else f"   goal <= {goal}: {'met' if value <= goal else 'MISSED'}"
        print(f"  {label:<26} {value:6.3f}{verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--inner", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall time, or process CPU time (robust on a shared CPU; with --threads 1)")
    args = parser.parse_args(argv)
    for name in ("repeats", "inner", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1")
    if args.batch % max(MICRO_BATCH_COUNTS):
        parser.error(f"--batch: must be a multiple of {max(MICRO_BATCH_COUNTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu: CPU time does not measure GPU work; use --clock wall with --device cuda")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads: must be >= 1")
        torch.set_num_threads(args.threads)
    result = measure(torch.device(args.device), args.batch, args.repeats, max(args.warmup, 0), args.inner, args.seed,
                     args.clock)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)


if __name__ == "__main__":
    main()
