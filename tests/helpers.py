"""Small helpers shared by the tests that start processes and servers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def mark_finished(store, run_id: str, **fields) -> None:
    """Take a queued run through running to completed, as a worker would, with the given fields."""
    assert store.claim(run_id, "h", "local") and store.start_run(run_id, 1, "h", "cpu")
    assert store.finish_run(run_id, "completed", **fields)


def stored_trained_run(store, workdir):
    """A tiny digits MLP really trained in `workdir` and recorded as a completed run: (run id, checkpoint)."""
    from samlab.config import preset
    from samlab.runs import jobs
    from samlab.train import run

    cfg = preset("digits-mlp", ["data.n_train=128", "epochs=1", "batch_size=64", "model.width=8"])
    checkpoint = str(run(cfg, workdir=workdir).checkpoint)
    run_id = jobs.submit(cfg, store=store, start=False)
    mark_finished(store, run_id, checkpoint_path=checkpoint)
    return run_id, checkpoint
