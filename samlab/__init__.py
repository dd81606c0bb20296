"""samlab: sharpness-aware minimization and the m-sharpness phenomenon, as a library and a dashboard.

`import samlab` loads nothing heavy (worker processes import it first); the names below are loaded on
first use (PEP 562):

    samlab.submit(config_or_params, *, kind="train", ...) -> run id     queue a background run
    samlab.wait(run_ids, *, timeout=None, ...) -> {run id: status}     block until they finish
    samlab.cancel(run_id), samlab.resume(run_id)
    samlab.runs_table(store=None, **filters) -> DataFrame               runs, config columns, summaries
    samlab.metrics(run_ids, names=None, ...) -> DataFrame               tidy, downsampled curves
    samlab.preset(name, overrides=()) -> RunConfig, samlab.RunConfig
    samlab.open_store(url=None) -> Store, samlab.checkpoint_of(run) -> a train run's checkpoint path
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "submit": "samlab.runs.jobs",
    "wait": "samlab.runs.jobs",
    "cancel": "samlab.runs.jobs",
    "resume": "samlab.runs.jobs",
    "runs_table": "samlab.notebook",
    "metrics": "samlab.notebook",
    "preset": "samlab.config",
    "RunConfig": "samlab.config",
    "open_store": "samlab.runs.store",
    "checkpoint_of": "samlab.checkpoints",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'samlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
