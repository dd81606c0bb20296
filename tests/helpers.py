"""Small helpers shared by the tests that start processes and servers."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

# `.ci/run` sets it: every layer must run, and a skip is a failure (tests/conftest.py)
REQUIRE_ALL = os.environ.get("SAMLAB_REQUIRE_ALL") == "1"


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


def backdate_heartbeat(store, run_id: str, seconds: float) -> None:
    """Move a run's last heartbeat `seconds` into the past, as if its worker had been silent that long."""
    import sqlalchemy as sa

    beat = store.get_run(run_id)["heartbeat_at"] - timedelta(seconds=seconds)
    query = sa.text("UPDATE runs SET heartbeat_at = :beat WHERE id = :id").bindparams(
        sa.bindparam("beat", type_=sa.DateTime))
    with store.engine.begin() as conn:
        conn.execute(query, {"beat": beat, "id": run_id})


def plotly_array(value) -> list[float]:
    """A plotly figure's array (plain list, or base64 typed array in the JSON spec)."""
    if isinstance(value, dict):
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    return list(value)


def _live_chart_args(at) -> list[dict]:
    """The arguments of every live chart frame (`dashboard.live_chart`) an AppTest run drew, in order."""
    import json

    return [json.loads(c.proto.json_args) for c in at.get("component_instance")
            if c.proto.component_name.endswith("live_chart")]


def chart_entries(at) -> list[tuple[str | None, dict]]:
    """(key, JSON spec) of every figure an AppTest run drew, in order: st.plotly_chart's, then the live
    chart frames' (whose arguments carry the key as the figure's revision)."""
    import json

    entries = [(c.key, json.loads(c.proto.spec)) for c in at.get("plotly_chart")]
    # a spec of None: a frame with nothing to draw (the feed of the active runs)
    entries += [(args["revision"], json.loads(args["spec"])) for args in _live_chart_args(at) if args["spec"] is not None]
    return entries


def _feed_frames(at) -> list[dict]:
    return [args for args in _live_chart_args(at) if args.get("feed")]


def progress_lines(at) -> list[dict]:
    """The progress line ({fraction, text}) of every live chart frame that draws one (a run card's)."""
    return [args["progress"] for args in _live_chart_args(at) if args.get("progress")]


def live_feeds(at) -> list[dict]:
    """The arguments of every live chart frame that follows a run's feed in an AppTest run (its
    progress, figure and feed file; `dashboard.live.FeedWriter`)."""
    return [args for args in _feed_frames(at) if args.get("active") is None]


def active_runs_frames(at) -> list[dict]:
    """The arguments of every frame that follows the feed of the active runs (`FeedWriter.watch_active`)."""
    return [args for args in _feed_frames(at) if args.get("active") is not None]


def chart_specs(at) -> dict[str, dict]:
    """Every keyed figure an AppTest run drew, by key (`chart_entries`)."""
    return dict(chart_entries(at))


def chart_traces(at, key: str) -> list[dict]:
    """The traces of the figure an AppTest run drew under `key` (`chart_specs`)."""
    return chart_specs(at)[key]["data"]


def record_fragments(monkeypatch) -> list[tuple[str, float | None]]:
    """Record every fragment a script defines, with its refresh interval."""
    import streamlit as st

    defined: list[tuple[str, float | None]] = []
    real = st.fragment

    def recording(func=None, *, run_every=None, **kwargs):
        def wrap(f):
            defined.append((f.__name__, run_every))
            return real(f, run_every=run_every, **kwargs)
        return wrap(func) if func is not None else wrap

    monkeypatch.setattr(st, "fragment", recording)
    return defined
