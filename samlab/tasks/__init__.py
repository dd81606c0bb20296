"""Registry of background task kinds: each kind names a module function the worker runs.

A task function has the signature `run_task(params: dict, reporter: Reporter, workdir: Path,
resume: bool) -> dict | None`; the returned dict is stored as the run's result. A module may also
define `check_task(params: dict) -> dict` that validates (ValueError) and normalises the params at
submit time, so bad input is refused before anything is queued. Imports are lazy so that listing
kinds costs nothing and a task's heavy imports happen in the worker only. Every analysis follows the
resumable protocol of `samlab.tasks.protocol`; `cache_key` puts the digest of every checkpoint a request
names into its key.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from samlab.tasks.protocol import request_key

TASKS: dict[str, str] = {
    "train": "samlab.tasks.train",
    "hessian": "samlab.tasks.hessian",
    "landscape": "samlab.tasks.landscape",
    "stability": "samlab.tasks.stability",
    "msharp": "samlab.tasks.msharp",
}


def task_module(kind: str):
    if kind not in TASKS:
        raise ValueError(f"kind: unknown task kind {kind!r}; known kinds: {sorted(TASKS)}")
    return importlib.import_module(TASKS[kind])


def task_function(kind: str) -> Callable[..., dict[str, Any] | None]:
    module = task_module(kind)
    if not hasattr(module, "run_task"):
        raise ValueError(f"kind: {kind!r} has no run_task in {TASKS[kind]}")
    return module.run_task


def check_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalise a task's params (ValueError with the field name on bad input)."""
    module = task_module(kind)
    check = getattr(module, "check_task", None)
    return check(params) if check is not None else dict(params)


def cache_key(kind: str, params: dict[str, Any]) -> str:
    """The run store's cache key of a request (params as normalised by the task's check): sha256 of kind,
    params and the contents of the checkpoints they name."""
    return request_key(kind, params)
