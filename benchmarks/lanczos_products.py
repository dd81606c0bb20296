"""How few Hessian-vector products any Lanczos run needs for the top eigenvalue of the Hessian benchmark's model.

`hessian_vs_pyhessian.py` times samlab's top-1 eigenvalue against PyHessian's power iteration; both pay
the same double-backward product, so the speed-up is the ratio of their product counts. This script
bounds that ratio from the other side: it forms the dense Hessian of the same trained digits CNN
(float64, plain double backward, one product per column), then runs Lanczos in float64 on it (full
reorthogonalisation) from many random Gaussian starts and records, after every product, the relative
error of the largest Ritz value against the dense eigenvalue. "Oracle stopping" (stop the moment the
error is below the target, knowing the answer) is a lower bound on the products any Krylov method
started from a random vector needs; power iteration with oracle stopping is shown beside it.

    python benchmarks/lanczos_products.py [--json] [--width W] [--starts N] [--steps S] [--target E]

The default width 10 (2,760 parameters) is the benchmark's "small" workload: the dense Hessian takes
about a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

# the sibling script (this directory is on sys.path)
from hessian_vs_pyhessian import SAMPLES, float64_products, trained_model

from samlab.config import DataConfig
from samlab.data import load_dataset


def dense_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """H of the mean loss in float64, eval mode: column i is the product with the i-th unit vector."""
    dim, product = float64_products(model, [(x, y)])
    hessian = torch.stack([product(unit) for unit in torch.eye(dim, dtype=torch.float64)], 1).numpy()
    return (hessian + hessian.T) / 2


def lanczos_errors(hessian: np.ndarray, top: float, start: np.ndarray, steps: int) -> list[float]:
    """|θ_max − λ_max| / λ_max after each of `steps` products (full reorthogonalisation)."""
    basis, alphas, betas, errors = [start / np.linalg.norm(start)], [], [], []
    for _ in range(steps):
        w = hessian @ basis[-1]
        alphas.append(float(basis[-1] @ w))
        for q in basis:  # twice is enough: orthogonal to working precision
            w -= (q @ w) * q
        for q in basis:
            w -= (q @ w) * q
        tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        errors.append(abs(np.linalg.eigvalsh(tridiagonal)[-1] - top) / abs(top))
        betas.append(float(np.linalg.norm(w)))
        if betas[-1] == 0.0:  # an invariant subspace: the Ritz values are exact from here on
            return errors + [errors[-1]] * (steps - len(errors))
        basis.append(w / betas[-1])
    return errors


def power_errors(hessian: np.ndarray, top: float, start: np.ndarray, steps: int) -> list[float]:
    """|v·Hv − λ_max| / λ_max after each product of power iteration (PyHessian's method)."""
    v, errors = start / np.linalg.norm(start), []
    for _ in range(steps):
        w = hessian @ v
        errors.append(abs(float(v @ w) - top) / abs(top))
        v = w / np.linalg.norm(w)
    return errors


def products_needed(errors: list[float], target: float) -> int | None:
    return next((i + 1 for i, e in enumerate(errors) if e <= target), None)


def summary(runs: list[list[float]], target: float) -> dict:
    needed = [products_needed(errors, target) for errors in runs]
    reached = [n for n in needed if n is not None]
    return {"median": statistics.median(reached) if reached else None, "max": max(reached) if reached else None,
            "unreached": len(needed) - len(reached)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--width", type=int, default=10, help="digits CNN width (10: the benchmark's small workload)")
    parser.add_argument("--starts", type=int, default=200, help="random start vectors")
    parser.add_argument("--steps", type=int, default=12, help="Lanczos products per start (power iteration: 4x)")
    parser.add_argument("--target", type=float, default=1e-4, help="relative error of the top eigenvalue")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_dataset(DataConfig(name="digits"))
    model = trained_model(args.width, data, args.seed)
    began = time.perf_counter()
    hessian = dense_hessian(model, data.x_train[:SAMPLES], data.y_train[:SAMPLES])
    seconds = time.perf_counter() - began
    eigenvalues = np.linalg.eigvalsh(hessian)[::-1]
    top = float(eigenvalues[0])
    rng = np.random.default_rng(args.seed)
    starts = [rng.standard_normal(len(hessian)) for _ in range(args.starts)]
    lanczos = [lanczos_errors(hessian, top, s, args.steps) for s in starts]
    power = [power_errors(hessian, top, s, 4 * args.steps) for s in starts]
    result = {
        "width": args.width, "parameters": len(hessian), "samples": SAMPLES, "dense_seconds": round(seconds, 2),
        "eigenvalues": {"top": [round(float(e), 6) for e in eigenvalues[:3]], "min": round(float(eigenvalues[-1]), 6)},
        "target": args.target, "starts": args.starts,
        "lanczos_median_error": [float(statistics.median(col)) for col in zip(*lanczos, strict=True)],
        "lanczos_share_reached": [sum(e <= args.target for e in col) / args.starts for col in zip(*lanczos, strict=True)],
        "products_needed": {"lanczos": summary(lanczos, args.target), "power": summary(power, args.target)},
    }  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    print(f"digits CNN width {args.width}: {result['parameters']} parameters, {SAMPLES} samples, dense Hessian in "
          f"{seconds:.0f} s; top eigenvalues {result['eigenvalues']['top']}, smallest {result['eigenvalues']['min']}")
    print(f"Lanczos from {args.starts} random starts, relative error of the top Ritz value after j products:")
    for j, (error, share) in enumerate(zip(result["lanczos_median_error"], result["lanczos_share_reached"],
                                           strict=True), 1):  # fmt: skip
        print(f"  j = {j:2d}: median {error:.1e}, share at <= {args.target:g}: {share:.2f}")
    for method, needed in result["products_needed"].items():
        print(f"{method} with oracle stopping: median {needed['median']}, max {needed['max']} products to reach "
              f"{args.target:g} ({needed['unreached']} starts never did)")


if __name__ == "__main__":
    main()
