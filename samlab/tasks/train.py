"""Background task "train": a training run's config in, its status, summary and checkpoint out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samlab.config import RunConfig
from samlab.reporting import Reporter
from samlab.train import run


def check_task(params: dict[str, Any]) -> dict[str, Any]:
    """Validate a training config given as a dict (background task interface)."""
    return RunConfig.from_dict(params).validate().to_dict()


def run_task(params: dict[str, Any], reporter: Reporter, workdir: Path, resume: bool) -> dict[str, Any]:
    """Background task "train": the worker's entry point."""
    result = run(RunConfig.from_dict(params), reporter, workdir=workdir, resume=resume)
    return {
        "status": result.status,
        "summary": result.summary,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }
