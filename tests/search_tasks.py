"""A synthetic "training" task for the adaptive-search tests, registered through SAMLAB_TASKS.

It takes a train config (dict) and, instead of training, reports per epoch a test accuracy with a
known optimum over ρ: acc(ρ) = exp(-(ln ρ - ln ρ*(m))² / 2) with ρ*(m) = OPTIMUM_AT_64 * sqrt(m / 64),
scaled by epoch / epochs, so runs far from ρ* are behind at every epoch (what a median pruner
catches). SEARCH_PROBE_SLEEP seconds pass per epoch; a stop request ends the run at once.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

OPTIMUM_AT_64 = 0.2


def optimum(m: int) -> float:
    return OPTIMUM_AT_64 * math.sqrt(m / 64)


def accuracy(rho: float, m: int) -> float:
    return math.exp(-0.5 * (math.log(rho) - math.log(optimum(m))) ** 2)


def check_task(params: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(params.get("optim"), dict) or "rho" not in params["optim"]:
        raise ValueError("optim.rho: the synthetic task needs a train config with a ρ")
    return params


def run_task(params: dict[str, Any], reporter, workdir: Path, resume: bool) -> dict[str, Any]:
    optim = params["optim"]
    m = optim["m"] if optim["method"] == "msam" else params["batch_size"]
    final = accuracy(float(optim["rho"]), int(m))
    sleep = float(os.environ.get("SEARCH_PROBE_SLEEP", "0"))
    epochs = int(params["epochs"])
    for epoch in range(1, epochs + 1):
        if reporter.should_stop():
            return {"status": "cancelled", "summary": {"epochs": epoch - 1}}
        time.sleep(sleep)
        acc = final * epoch / epochs
        reporter.metrics("epoch", epoch, {"test_acc": acc, "train_acc": acc})
        reporter.progress(epoch, epochs, f"epoch {epoch}/{epochs}")
    return {"status": "completed", "summary": {"final_test_acc": final, "final_train_acc": final,
                                                "generalization_gap": 0.0}}
