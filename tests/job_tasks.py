"""Small background task kinds for the run-store tests, registered through SAMLAB_TASKS.

`count`: a resumable accumulator. Step k adds k * scale to a running total and reports it; every
`checkpoint_every` steps (and on a stop request) the state is written atomically to workdir/state.json,
and resume continues from it (`ignore_stop` makes a worker that needs the hard kill). The final total has a closed form, sum_{k<steps} k * scale, which the
tests use as the oracle for "resumed equals uninterrupted".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATE = "state.json"


def check_task(params: dict[str, Any]) -> dict[str, Any]:
    out = {"steps": 20, "sleep": 0.0, "scale": 1.0, "checkpoint_every": 5, "ignore_stop": False, **params}
    if not isinstance(out["steps"], int) or out["steps"] < 1:
        raise ValueError(f"steps: must be a positive integer (got {out['steps']!r})")
    if not isinstance(out["sleep"], (int, float)) or out["sleep"] < 0:
        raise ValueError(f"sleep: must be >= 0 (got {out['sleep']!r})")
    return out


def _save(workdir: Path, step: int, total: float) -> None:
    tmp = workdir / (STATE + ".tmp")
    tmp.write_text(json.dumps({"step": step, "total": total}))
    os.replace(tmp, workdir / STATE)


def _load(workdir: Path) -> tuple[int, float]:
    path = workdir / STATE
    if not path.is_file():
        raise ValueError(f"resume: no saved state at {path}")
    try:
        state = json.loads(path.read_text())
        return int(state["step"]), float(state["total"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"resume: saved state {path} is corrupt ({exc})") from None


def run_task(params: dict[str, Any], reporter, workdir: Path, resume: bool) -> dict[str, Any]:
    p = check_task(params)
    step, total = _load(workdir) if resume else (0, 0.0)
    while step < p["steps"]:
        if reporter.should_stop() and not p["ignore_stop"]:
            _save(workdir, step, total)
            return {"stopped_at": step, "total": total}
        total += step * p["scale"]
        reporter.metrics("step", step, {"total": total, "k": float(step)})
        step += 1
        reporter.progress(step, p["steps"], f"step {step}")
        if step % p["checkpoint_every"] == 0:
            _save(workdir, step, total)
        time.sleep(p["sleep"])
    return {"total": total, "steps": step}
