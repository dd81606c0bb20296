"""A plotly figure that a live panel redraws in place (a Streamlit component).

`st.plotly_chart` gives a figure with new data a new element identity, so the browser mounts a new chart
and draws the whole figure from scratch at every refresh of a live panel, and resets the reader's zoom.
This component keeps one frame per key; each refresh sends the figure, and `Plotly.react` in the frame
redraws only what changed, in the frame's own small document; zoom and legend choices survive the
refreshes. Headless Chromium on 2 cores, the Train page watching one run: 0.35–0.43 of a core with
`st.plotly_chart`, 0.13–0.16 with this component. The frames of a page share one compiled plotly.js
(same origin), so only the page's first frame pays for compiling it (≈ 2 s of a core here).

The frame loads plotly.js from the `plotly` Python package (the same version the figures are built
with): the component's folder is assembled once per machine, under the system's temporary directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import plotly
from plotly.io.json import to_json_plotly

FRONTEND = Path(__file__).resolve().parent
FILES = ("index.html", "live_chart.js")


def plotly_js() -> Path:
    """plotly.min.js of the installed plotly package."""
    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


def component_dir() -> Path:
    """The component's folder: its own files and plotly.min.js, built once (atomically) per content."""
    digest = hashlib.sha256(plotly.__version__.encode())
    for name in FILES:
        digest.update((FRONTEND / name).read_bytes())
    target = Path(tempfile.gettempdir()) / f"samlab-live-chart-{digest.hexdigest()[:16]}"
    if (target / "plotly.min.js").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix="samlab-live-chart-", dir=target.parent))
    for name in FILES:
        shutil.copyfile(FRONTEND / name, staging / name)
    shutil.copyfile(plotly_js(), staging / "plotly.min.js")  # last: its presence marks a complete folder
    staging.chmod(0o755)  # mkdtemp made it private: another user's dashboard on this machine reads it too
    try:
        os.rename(staging, target)
    except OSError:  # another process built it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.cache
def _component():
    from streamlit.components import v1 as components

    return components.declare_component("live_chart", path=str(component_dir()))


def figure_json(fig: Any) -> str:
    """A figure as the frame draws it: plotly JSON without the template (the frame applies the
    Streamlit theme's colours itself)."""
    spec = fig.to_dict()
    spec["layout"].pop("template", None)
    return to_json_plotly(spec)


FEEDS = "feeds"  # the component's subfolder of live feed files (`dashboard.live.FeedWriter`)


def feeds_folder() -> Path:
    """A new folder for one server's live feeds, inside the component's folder (so that the frames can
    fetch the files) and named so that two dashboards on one machine never share one."""
    parent = component_dir() / FEEDS
    parent.mkdir(exist_ok=True)
    with contextlib.suppress(PermissionError):  # made by another user of the machine, who keeps it open
        parent.chmod(0o1777)  # like /tmp: every dashboard makes its own folder in it
    return parent / uuid.uuid4().hex


def show(fig: Any, *, key: str, config: dict[str, Any] | None = None, progress: dict[str, Any] | None = None) -> None:
    """Draw `fig` in the live chart `key` (with `progress`, {fraction, text}, a progress line above it):
    the first call draws it, later calls with the same key redraw what changed in the same frame."""
    _draw(key, config, spec=figure_json(fig), progress=progress)


def show_feed(feed: dict[str, Any], folder: Path, *, key: str, rerun_at_end: bool = True,
              active: list[str] | None = None, stage: Any = None, stage_every_s: float | None = None,
              config: dict[str, Any] | None = None) -> None:
    """Draw a feed (`dashboard.live.FeedWriter`) — a watched run's progress and figure, or nothing for the
    feed of the active runs — in the live chart `key`; the frame then fetches the feed's file by itself
    and redraws what changed, with no script run. The frame sets the component's value, which runs the
    page again, when the feed ends (with `rerun_at_end`), or its active runs are no longer `active`
    (None: not looked at), or — with `stage_every_s` — its stage is no longer `stage`, once the page's
    last run is that many seconds old."""
    url = f"{FEEDS}/{folder.name}/{feed['file']}"
    stages = {} if stage_every_s is None else {"stage": stage, "stage_every_s": stage_every_s}
    _draw(key, config, spec=feed.get("spec"), progress=feed.get("progress"), version=feed["version"], feed=url,
          next_s=feed["next_s"], rerun_at_end=rerun_at_end, active=active, **stages)


def _draw(key: str, config: dict[str, Any] | None, **args: Any) -> None:
    _component()(**args, config={**(config or {}), "responsive": True}, revision=key, key=key, default=None)
