"""Background task "msharp": m-sharpness and gradient noise of a checkpoint against the micro-batch size m.

Measured on a seeded random subset of n_samples training samples. Partial results are published after
each m and kept in the task's workdir, so a resumed task skips what it already measured.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from samlab.checkpoints import load_trained
from samlab.msharp import m_sharpness_curve
from samlab.noise import microbatch_noise_curve, noise_summary, per_sample_grads
from samlab.reporting import Reporter
from samlab.tasks.protocol import TaskState, seeded_subset
from samlab.validation import check_int, check_positive

PARTIAL_FILE = "msharp_partial.json"
TASK_DEFAULTS: dict[str, Any] = {
    "ms": [256, 64, 16, 4, 1],
    "rho": 0.05,
    "steps": 1,
    "n_samples": 512,
    "partitions": 4,
    "seed": 0,
    "device": "cpu",
}


def check_task(params: dict[str, Any]) -> dict[str, Any]:
    """Validate and fill the params of an "msharp" task: checkpoint (path), ms, rho, steps, n_samples,
    partitions, seed, device."""
    unknown = set(params) - set(TASK_DEFAULTS) - {"checkpoint"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown field; known fields: {sorted([*TASK_DEFAULTS, 'checkpoint'])}")
    out = TASK_DEFAULTS | dict(params)
    if not isinstance(out.get("checkpoint"), str) or not out["checkpoint"]:
        raise ValueError("checkpoint: path of a training checkpoint (checkpoint.pt) is required")
    for name in ("n_samples", "steps", "partitions"):
        check_int(name, out[name], 1)
    check_int("seed", out["seed"], 0)
    if not isinstance(out["ms"], list) or not out["ms"]:
        raise ValueError("ms: a non-empty list of micro-batch sizes")
    for m in out["ms"]:
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= out["n_samples"]:
            raise ValueError(f"ms: each m must be an integer in [1, n_samples={out['n_samples']}] (got {m!r})")
    out["rho"] = check_positive("rho", out["rho"])
    out["ms"] = sorted(set(out["ms"]), reverse=True)
    return out


def micro_batch_sizes(n: int) -> list[int]:
    """Micro-batch sizes for n samples, from n down to 1: the divisors of n nearest (by ratio) to n, n/3,
    n/10, n/30 and 1, so that every m is an exact partition of the samples."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    nearest = {min(divisors, key=lambda d: abs(math.log(d / target))) for target in (n, n / 3, n / 10, n / 30, 1)}
    return sorted(nearest, reverse=True)


def _check_ms_fit(ms: list[int], n: int, n_samples: int) -> None:
    """Every m must fit in the n samples measured, which are fewer than n_samples on a small train set."""
    too_big = [m for m in ms if m > n]
    if too_big:
        raise ValueError(f"ms: m = {too_big[0]} is more than the {n} samples measured (this checkpoint's train set "
                         f"has {n} < n_samples = {n_samples}); choose each m <= {n}, e.g. ms={micro_batch_sizes(n)}")


def run_task(params: dict[str, Any], reporter: Reporter, workdir: Path, resume: bool) -> dict[str, Any]:
    """m-sharpness S_m and the gradient-noise curve (tr V, E‖∇L_I‖, SDE regularizers) against m."""
    p = check_task(params)
    trained = load_trained(p["checkpoint"], device=p["device"])
    x, y = seeded_subset(trained.data.x_train, trained.data.y_train, p["n_samples"], p["seed"])
    _check_ms_fit(p["ms"], len(x), p["n_samples"])
    state = TaskState(workdir, PARTIAL_FILE, "msharp", p)
    result = state.load(resume)
    if result is None:
        grads = per_sample_grads(trained.model, trained.loss_fn, x, y)
        result = {
            "params": p,
            "checkpoint_epoch": trained.epoch,
            "n": len(x),
            "noise": noise_summary(grads, with_sample_norms=True),
            "noise_curve": microbatch_noise_curve(grads, p["ms"], rho=p["rho"], partitions=p["partitions"],
                                                  seed=p["seed"]),
            "sharpness_curve": [],
        }
        state.save(result)
        reporter.result(result)
    done = {row["m"] for row in result["sharpness_curve"]}
    todo = [m for m in p["ms"] if m not in done]
    for i, m in enumerate(todo):
        if reporter.should_stop():
            return result
        row = m_sharpness_curve(trained.model, trained.loss_fn, x, y, ms=[m], rho=p["rho"], steps=p["steps"],
                                partitions=p["partitions"], seed=p["seed"])[0]
        result["sharpness_curve"].append(row)
        state.save(result)
        reporter.result(result)
        reporter.progress(len(done) + i + 1, len(p["ms"]), f"m-sharpness at m={m}")
    return result
