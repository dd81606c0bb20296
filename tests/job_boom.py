"""Background task kind `boom` for the run-store tests: reports a metric, then raises."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_task(params: dict[str, Any], reporter, workdir: Path, resume: bool) -> dict[str, Any]:
    reporter.metrics("step", 0, {"before_boom": 1.0})
    raise RuntimeError(f"boom: {params.get('message', 'deliberate failure')}")
