"""Shared Streamlit helpers for every dashboard page: store access, run pickers, errors, empty states,
live fragments, the figure theme. The only module of `dashboard/` that talks to both streamlit and the
run store; figure construction lives in `dashboard.figures`, tables and legends in `dashboard.tables`,
config widgets in `dashboard.forms`.

A page is thin — widgets → a config or params → a samlab call (usually a background run) → a figure:

    import streamlit as st
    from dashboard import common as ui
    from dashboard import figures

    ui.page_setup("Hessian", "Top eigenvalues, trace and spectral density of a trained model.")
    run_id = ui.run_picker("Trained run", key="hessian.run")      # shows an empty state when None
    if run_id is None:
        st.stop()
    params = {...}
    run = ui.cached_or_submit("hessian", params, label="Compute spectrum")   # background run
    ui.task_progress(run)                                       # progress bar with ETA, error if failed
    if run and run.get("result"):
        ui.show_figure(figures.some_builder(run["result"]))

Stable API (other pages rely on it; extend, do not change):

    page_setup(title, intro=None, icon=None)     set_page_config, the lock (require_access), title, intro; call first
    get_store() -> samlab.runs.store.Store            one store per URL (SAMLAB_STORE or the default SQLite file)
    store_url() -> str
    list_runs(kind="train", status=None, group=None, text=None, limit=1000) -> list[dict]
    run_config(run) -> RunConfig | None          a train run's config (None when its params do not parse)
    run_labels(runs) -> dict[id, str]            the one run label: differing hyperparameters + short id, ≤ 60 chars
    run_details(runs) -> dict[id, str]           the full config behind a label (hover text)
    run_picker(label, *, key, kind="train", statuses=("completed",), multi=False, default=None, help=None)
        -> id | list[id] | None                  with an empty state (and a link to Train) when nothing fits
    empty_state(message, page=None, link_label=None)
    page_link(page, label)                       st.page_link that degrades to a plain link
    field_error(slot, message)                   a compact error right under a widget (slot = st.empty())
    show_exception(err, what)                    a ValueError's message as an error box, not a traceback
    show_figure(fig, key=None)                   plotly with the Streamlit theme (light and dark)
    show_live_figure(fig, key, progress=None)    the same for a live panel: redrawn in place at each refresh
    show_live_feed(feed, folder, *, key, rerun_at_end, active, stage, stage_every_s)   a feed, followed by its frame
    live(seconds)                                decorator: st.fragment(run_every=seconds); None: no refresh
    live_while_active(seconds, key)              decorator: a panel of runs that refreshes while they are active
    submit(kind, params, *, name="", group=None) -> id | None   errors shown, nothing queued
    submit_train(configs) -> [id] | None          one run, or one group of runs (one per seed)
    cancel_run(id) -> str, resume_run(id) -> str, delete_run(id)   ValueError when not possible
    load_metrics(run_ids, names=None, kind=None, max_points=2000) -> long DataFrame
    load_run_metrics(runs, names=None, kind=None, max_points=2000, live_key=None)
                                        the same, finished runs cached by id, active ones read
                                        incrementally under a live panel's key
    metrics_csv(run_ids, labels) -> () -> str    the raw metrics as CSV, built when a download button is clicked
    metric_times(run_ids) -> DataFrame           wall-clock seconds of each logged step (x = time)
    ViewParams(st.query_params, prefix)          widgets whose values live in the URL
    cached_or_submit(kind, params, *, label, key) -> run dict | None   reuse a cached run or offer a button
    compute_all(requests, *, key, where=None) -> int   one button queuing every missing analysis of a page
    queue_places(run_ids) -> {id: (place, length)}     where queued runs stand in the queue (oldest first)
    task_progress(run, live_every_s=None)        status line, progress bar with ETA, error text of a failed run;
                                        live_every_s: an active run's progress follows its live feed
    task_result(task, live_every_s=None) -> result | None   its progress shown until it completes, its result
    result_digest(run) -> str                    changes with every stage a run publishes of its result
    progress_text(run, now) -> (fraction, text)  pure-ish: the progress bar's value and label
    feed_progress(store) -> (run, now) -> (fraction, text)   the same led by status and queue place (live feeds)
    log_tail(run, lines=20) -> str
    status_label(status) -> str                  markdown: material icon + the status in its colour
    page_files() -> list[Path]                   the multipage files under pages/, in menu order
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from dashboard import access, tables
from dashboard.live import LIVE_MAX_POINTS, LiveCurves
from dashboard.tables import run_config, run_details, run_labels  # part of this module's API; pure, in tables
from samlab.config import RunConfig
from samlab.runs.store import ACTIVE, FINAL, STATUSES, Store, default_url, display_url, open_store

ROOT = Path(__file__).resolve().parent.parent
PAGES_DIR = ROOT / "pages"
TRAIN_PAGE = "pages/1_Train.py"
RUNS_PAGE = "pages/2_Runs.py"

# Material icons and theme colours: they render without emoji fonts and read in light and dark themes.
STATUS_STYLES: dict[str, tuple[str, str]] = {
    "queued": ("schedule", "gray"),
    "running": ("play_circle", "blue"),
    "completed": ("check_circle", "green"),
    "failed": ("error", "red"),
    "cancelled": ("stop_circle", "orange"),
    "diverged": ("warning", "red"),
    "pruned": ("content_cut", "violet"),
}
ICON_INFO = ":material/lightbulb:"
ICON_WARNING = ":material/warning:"
ICON_ERROR = ":material/error:"

__all__ = [
    "ACTIVE", "FINAL", "STATUSES", "ICON_INFO", "ICON_WARNING", "ICON_ERROR", "page_setup", "get_store", "store_url", "list_runs", "run_config",
    "run_labels", "run_details", "run_picker", "empty_state", "field_error", "show_exception", "show_figure", "live",
    "submit", "submit_train", "cancel_run", "resume_run", "delete_run", "load_metrics", "load_run_metrics", "metrics_csv",
    "metric_times",
    "ViewParams", "cached_or_submit", "task_progress", "progress_text", "log_tail", "status_label", "page_files",
]


# -- page and store ---------------------------------------------------------------------------------
# The browser tab's icon, served by the dashboard itself: a Material icon would be fetched from
# fonts.gstatic.com, which an offline machine cannot reach.
PAGE_ICON = Path(__file__).resolve().parent / "static" / "favicon.png"


def page_setup(title: str, intro: str | None = None, icon: str | None = None) -> None:
    """The first call of every page: tab title, wide layout, the page title and a one-line intro."""
    _run_through_the_navigation()
    st.set_page_config(page_title=f"{title} · samlab", page_icon=icon or str(PAGE_ICON), layout="wide")
    require_access()
    st.title(title)
    if intro:
        st.caption(intro)


def _run_through_the_navigation() -> None:
    """Run the page again through app.py when Streamlit ran it without it.

    A server whose app has a pages/ folder starts in Streamlit's old multipage mode: until some script
    run of app.py calls `st.navigation` (which ends that mode for the whole server), a page opened first
    (a bookmark, a reload after a restart) runs on its own, and its sidebar lists "app" in place of Home.
    Ending the mode here and running again makes this run go through app.py's navigation, which picks
    the same page (a page's identity is its URL path either way). Streamlit's flag is private: where it
    is not there, nothing happens. Not under streamlit.testing, which puts every run in that mode (the
    AppTest tests run pages on their own).
    """
    try:
        from streamlit.runtime import Runtime
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:
        return
    if type(st.runtime.get_instance()) is not Runtime:  # streamlit.testing's runtime is a mock of it
        return
    if getattr(PagesManager, "uses_pages_directory", None):
        PagesManager.uses_pages_directory = False
        st.rerun()


def require_access() -> None:
    """The lock (`dashboard.access`): on a server bound to anything but loopback, stop the page unless
    SAMLAB_PASSWORD is set, and then until this session has typed it once."""
    from streamlit.runtime import Runtime

    if not isinstance(st.runtime.get_instance(), Runtime):
        return  # no server (streamlit.testing runs the script in-process): no door to lock
    address = st.get_option("server.address")
    if not access.needs_password(address):
        return
    reason = access.refusal(address)
    if reason:
        st.error(reason, icon=ICON_ERROR)
        st.stop()
    if st.session_state.get(UNLOCKED_KEY):
        return
    st.title("samlab")
    with st.form("samlab.login"):
        typed = st.text_input("Password", type="password", help=f"the server's {access.PASSWORD_ENV}")
        entered = st.form_submit_button("Enter", type="primary")
    if entered and access.check_password(typed, access.password()):
        st.session_state[UNLOCKED_KEY] = True
        st.rerun()
    if entered:
        st.error("Wrong password.", icon=ICON_WARNING)
    st.stop()


UNLOCKED_KEY = "samlab.unlocked"


def store_url() -> str:
    return default_url()


def store_url_for_display() -> str:
    """The store URL with any password masked: safe to show on a page or in a screenshot."""
    return display_url(store_url())


@st.cache_resource(show_spinner=False)
def _store_for(url: str) -> Store:
    return open_store(url)


def get_store() -> Store:
    """The run store at the current URL (SAMLAB_STORE or the repository's SQLite file)."""
    return _store_for(store_url())


def list_runs(kind: str | Iterable[str] | None = "train", status: str | Iterable[str] | None = None,
              group: str | None = None, text: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Runs newest first (see `Store.list_runs`)."""
    return get_store().list_runs(status=status, kind=kind, group=group, text=text or None, limit=limit)


def status_label(status: str) -> str:
    """Markdown for a status: its icon and the word in the status colour, e.g. ':green[... completed]'."""
    icon, colour = STATUS_STYLES.get(status, ("circle", "gray"))
    return f":{colour}[:material/{icon}: {status}]"


def page_files() -> list[Path]:
    """The pages of the multipage app, in Streamlit's menu order (numeric prefix, then name)."""
    if not PAGES_DIR.is_dir():
        return []
    return sorted(PAGES_DIR.glob("*.py"), key=_page_order)


def navigation_pages() -> list[Any]:
    """st.Page entries for every file under pages/, titled as the sidebar shows them ('Lesson m-sharpness')."""
    return [st.Page(f"pages/{path.name}", title=page_title(path)) for path in page_files()]


def _page_order(path: Path) -> tuple[int, str]:
    head = path.stem.split("_", 1)[0]
    return (int(head), path.stem) if head.isdigit() else (10**6, path.stem)


def page_title(path: Path) -> str:
    """'3_Hessian.py' → 'Hessian'; 'x_Lesson_m-sharpness.py' → 'Lesson m-sharpness' (Streamlit's rule)."""
    stem = path.stem
    head, _, rest = stem.partition("_")
    return (rest if head.isdigit() and rest else stem).replace("_", " ")


# -- pickers and empty states -------------------------------------------------------------------------
LABEL_HELP = ("Runs are named by the hyperparameters that differ among them (… when more differ than fit) and a "
              "short id; the Runs page's table and the curves' hover show every hyperparameter.")

def run_picker(label: str, *, key: str, kind: str = "train", statuses: Sequence[str] | None = ("completed",),
               multi: bool = False, default: str | Sequence[str] | None = None,
               help: str | None = None) -> str | list[str] | None:
    """Pick one run (or several with multi=True) among runs of `kind` in `statuses`.

    Options are labelled by `run_labels`: the hyperparameters that differ among them and a short id. When no run fits, an
    empty state says what to do and the picker returns None (or [] with multi=True).
    """
    runs = list_runs(kind=kind, status=list(statuses) if statuses else None)
    if not runs:
        wanted = " or ".join(statuses) if statuses else "any"
        empty_state(f"No {wanted} {kind} runs yet — launch one on the Train page.", page=TRAIN_PAGE,
                    link_label="Go to Train")
        return [] if multi else None
    labels = run_labels(runs)
    ids = [r["id"] for r in runs]
    help = help or LABEL_HELP
    if multi:
        chosen = [d for d in (default or []) if d in ids]
        return st.multiselect(label, ids, default=chosen, format_func=labels.get, key=key, help=help)
    index = ids.index(default) if isinstance(default, str) and default in ids else 0
    return st.selectbox(label, ids, index=index, format_func=labels.get, key=key, help=help)


def empty_state(message: str, page: str | None = None, link_label: str | None = None) -> None:
    """An info box that says what to do, with a link to the page where it is done."""
    st.info(message, icon=ICON_INFO)
    if page is not None and (ROOT / page).exists():
        page_link(page, link_label or f"Open {page_title(Path(page))}")


def page_link(page: str, label: str, icon: str = ":material/arrow_forward:") -> None:
    """st.page_link, or a plain link when the page registry does not know the page (a page script
    run on its own, e.g. by a test, sees no other pages)."""
    try:
        st.page_link(page, label=label, icon=icon)
    except StreamlitPageNotFoundError:
        st.markdown(f"{icon} [{label}](/{page_title(Path(page)).replace(' ', '_')})")


def field_error(slot: Any, message: str | None) -> None:
    """Show (or clear, with None) a validation message right under its widget."""
    if message:
        slot.error(message, icon=ICON_WARNING)
    else:
        slot.empty()


def show_exception(err: Exception, what: str) -> None:
    """A ValueError (bad input, missing data) as a readable error box; anything else with details."""
    if isinstance(err, ValueError):
        st.error(f"{what}: {err}", icon=ICON_WARNING)
    else:
        st.error(f"{what} failed: {type(err).__name__}: {err}", icon=ICON_ERROR)
        with st.expander("details"):
            st.exception(err)


# -- figures and live fragments -----------------------------------------------------------------------
PLOTLY_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


def show_figure(fig: Any, key: str | None = None) -> None:
    """Draw a plotly figure with the Streamlit theme, so it follows the light or dark setting."""
    st.plotly_chart(fig, theme="streamlit", key=key, config=PLOTLY_CONFIG)


def show_live_figure(fig: Any, key: str, progress: dict[str, Any] | None = None) -> None:
    """A live panel's figure: the same frame at every refresh, only what changed redrawn, the reader's
    zoom kept (`dashboard.live_chart`; `show_figure` would draw the whole figure anew each time); with
    `progress` ({fraction, text}) a progress line above it."""
    from dashboard import live_chart

    live_chart.show(fig, key=key, config=PLOTLY_CONFIG, progress=progress)


def show_live_feed(feed: dict[str, Any], folder: Any, *, key: str, rerun_at_end: bool = True,
                   active: list[str] | None = None, stage: Any = None, stage_every_s: float | None = None) -> None:
    """A live feed (`dashboard.live.FeedWriter`) — a watched run's progress and figure — in a frame that
    follows it by itself and runs the page again when the feed ends (with `rerun_at_end`), when the
    active runs are no longer `active` (None: not looked at), or — with `stage_every_s` — when the run's
    published stage is no longer `stage`."""
    from dashboard import live_chart

    live_chart.show_feed(feed, folder, key=key, rerun_at_end=rerun_at_end, active=active, stage=stage,
                         stage_every_s=stage_every_s, config=PLOTLY_CONFIG)


def live(seconds: float | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the function re-runs every `seconds` on its own (a fragment), not the whole page;
    with None it is a fragment that never refreshes by itself (a panel of finished runs)."""
    return st.fragment(run_every=seconds)


def live_while_active(seconds: float, key: str) -> Callable[[Callable[[], bool]], Callable[[], None]]:
    """Decorator for a panel of several runs (a sweep, a search) that returns whether they are still
    active: a fragment that re-runs every `seconds` while they are, and never once they are not (an open
    page then costs the runs nothing). When the answer changes, the whole page runs again, which defines
    the fragment anew; the last answer is kept in the session under `key`."""
    def wrap(panel: Callable[[], bool]) -> Callable[[], None]:
        drawn_active = st.session_state.get(key, True)

        @st.fragment(run_every=seconds if drawn_active else None)
        @functools.wraps(panel)
        def fragment() -> None:
            active = bool(panel())
            st.session_state[key] = active
            if active != drawn_active:
                st.rerun()

        return fragment

    return wrap


# -- background runs ----------------------------------------------------------------------------------
def submit(kind: str, params: dict[str, Any], *, name: str = "", group: str | None = None) -> str | None:
    """Queue a background run; a validation error is shown and nothing is queued (returns None)."""
    from samlab.runs import jobs

    try:
        return jobs.submit(params, kind=kind, name=name or None, group=group, store=get_store())
    except ValueError as err:
        show_exception(err, "Not queued")
        return None


def submit_train(configs: Sequence[RunConfig]) -> list[str] | None:
    """Queue training runs: one run, or several (one per seed) as one group. Errors are shown."""
    from samlab.runs import jobs

    store = get_store()
    try:
        if len(configs) == 1:
            return [jobs.submit(configs[0], store=store)]
        first = configs[0]
        name = first.name or first.label().rsplit(" seed=", 1)[0]
        group = jobs.submit_sweep(list(configs), f"{name} × {len(configs)} seeds", store=store)
    except ValueError as err:
        show_exception(err, "Not queued")
        return None
    return [r["id"] for r in store.list_runs(group=group, limit=len(configs))]


def cached_or_submit(kind: str, params: dict[str, Any], *, label: str, key: str) -> dict[str, Any] | None:
    """The newest queued, running or completed run of this analysis (same kind and params), else a
    button that submits it. Returns the run dict (with its result) or None."""
    from samlab import tasks
    from samlab.runs import jobs

    try:
        normalised = tasks.check_params(kind, params)
    except ValueError as err:
        show_exception(err, "Invalid settings")
        return None
    store = get_store()
    found = store.find_cached(tasks.cache_key(kind, normalised))
    if found is not None:
        return found
    if st.button(label, key=key, type="primary"):
        try:
            return store.get_run(jobs.submit_cached(kind, normalised, store=store))
        except ValueError as err:
            show_exception(err, "Not queued")
    return None


def compute_all(requests: Sequence[tuple[str, dict[str, Any]]], *, key: str, where: Any = None) -> int:
    """One "Compute all" button that queues every analysis among `requests` ((kind, params) pairs) that
    is not queued, running or done yet, then reruns the page; nothing is drawn when none is missing.
    Returns how many are missing."""
    from samlab import tasks
    from samlab.runs import jobs

    store = get_store()
    missing = []
    for kind, params in requests:
        try:
            normalised = tasks.check_params(kind, params)
        except ValueError:
            continue  # the analysis' own button shows the error
        if store.find_cached(tasks.cache_key(kind, normalised)) is None:
            missing.append((kind, normalised))
    if len(missing) < 2:  # one missing analysis has its own button
        return len(missing)
    if (where or st).button(f"Compute all ({len(missing)} missing)", key=key, type="primary",
                            help="queue every analysis this page shows that is not computed yet"):
        for kind, params in missing:
            try:
                jobs.submit_cached(kind, params, store=store)
            except ValueError as err:
                show_exception(err, "Not queued")
                return len(missing)
        st.rerun()
    return len(missing)


def queue_places(run_ids: Iterable[str], store: Store | None = None) -> dict[str, tuple[int, int]]:
    """(place, length) in the queue of each queued run among `run_ids`: the scheduler starts queued runs
    oldest first, so place 1 starts next when a slot frees."""
    queue = [r["id"] for r in (store or get_store()).runs_with_status(["queued"])]
    wanted = set(run_ids)
    return {run_id: (index + 1, len(queue)) for index, run_id in enumerate(queue) if run_id in wanted}


def cancel_run(run_id: str) -> str:
    """Cancel a queued run, or ask a running one to checkpoint and stop."""
    from samlab.runs import jobs

    outcome = jobs.cancel(run_id, store=get_store())
    return "cancelled" if outcome == "cancelled" else "stop requested: the run checkpoints, then stops"


def resume_run(run_id: str) -> str:
    from samlab.runs import jobs

    jobs.resume(run_id, store=get_store())
    return f"run {run_id} queued to resume from its checkpoint"


def delete_run(run_id: str) -> None:
    """Delete a finished run's rows and its folder (checkpoints, log)."""
    from samlab.runs import jobs

    jobs.delete(run_id, store=get_store(), files=True)


def progress_text(run: dict[str, Any], now: datetime | None) -> tuple[float, str]:
    """The progress bar's fraction and label: percent, the run's message, elapsed time and ETA."""
    fraction = float(run.get("progress") or 0.0)
    fraction = min(max(fraction, 0.0), 1.0)
    started = run.get("started_at")
    elapsed = (now - started).total_seconds() if (started is not None and now is not None) else None
    if run.get("status") in FINAL and run.get("finished_at") is not None and started is not None:
        elapsed = (run["finished_at"] - started).total_seconds()
    parts = [f"{100 * fraction:.0f}%"]
    if run.get("progress_message"):
        parts.append(str(run["progress_message"]))
    if elapsed is not None:
        parts.append(f"elapsed {tables.format_duration(elapsed)}")
    if run.get("status") == "running" and elapsed is not None:
        parts.append(f"ETA {tables.format_duration(tables.eta_seconds(fraction, 1.0, elapsed))}")
    return fraction, " · ".join(parts)


def task_progress(run: dict[str, Any] | None, *, live_every_s: float | None = None) -> None:
    """Status, progress bar with ETA, and the error of a failed run. With `live_every_s`, an active run's
    status, queue place and progress follow its live feed in a frame (no script run meanwhile), and the
    page runs again when the run ends, or when it published more of its result and the page's last run
    is `live_every_s` old."""
    if run is None:
        return
    if live_every_s is not None and run["status"] in ACTIVE:
        # the status and the queue place are in the frame's line: they change without a script run
        st.markdown(f"run `{run['id']}`")
        writer = _task_feeds(store_url())
        show_live_feed(writer.watch(run), writer.folder, key=f"task-progress.{run['id']}",
                       stage=result_digest(run), stage_every_s=live_every_s)
    else:
        st.markdown(f"**{status_label(run['status'])}** · run `{run['id']}`{_queue_place(run)}")
        fraction, text = progress_text(run, get_store().server_now())
        st.progress(fraction, text=text)
    if run.get("error") and run["status"] in ("failed", "diverged", "cancelled"):
        st.error(_first_lines(run["error"]), icon=ICON_ERROR)


def result_digest(run: dict[str, Any]) -> str:
    """A short digest of what a run has published of its result (changes with every published stage)."""
    text = json.dumps(run.get("result"), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _queue_place(run: dict[str, Any], store: Store | None = None) -> str:
    """" · place p of n in the queue" for a queued run, else ""."""
    place = queue_places([run["id"]], store).get(run["id"]) if run["status"] == "queued" else None
    return f" · place {place[0]} of {place[1]} in the queue" if place else ""


@st.cache_resource(show_spinner=False)
def _task_feeds(url: str):
    """The server's writer of background analyses' live feeds: the progress line (`feed_progress`) and
    the result's digest; no figure."""
    from dashboard import live, live_chart

    store = get_store()
    return live.FeedWriter(store, live_chart.feeds_folder(), progress=feed_progress(store), stage=result_digest)


def feed_progress(store: Store) -> Callable[[dict[str, Any], datetime | None], tuple[float, str]]:
    """A live feed's progress line (`progress_text`) led by the run's status and queue place, which the
    frame shows as they change (the page does not run again when a queued run starts)."""
    def line(run: dict[str, Any], now: datetime | None) -> tuple[float, str]:
        fraction, text = progress_text(run, now)
        return fraction, f"{run['status']}{_queue_place(run, store)} · {text}"

    return line


def task_result(task: dict[str, Any] | None, *, live_every_s: float | None = None) -> dict[str, Any] | None:
    """A background analysis run as this page run read it (`cached_or_submit`): its progress shown until
    it completes (`task_progress`, which follows an active run's feed with `live_every_s`), and its result
    (partial while it computes; None before anything was published or when there is no run)."""
    if task is None:
        return None
    if task["status"] != "completed":
        task_progress(task, live_every_s=live_every_s)
    return task.get("result")


def log_tail(run: dict[str, Any], lines: int = 20) -> str:
    """The last lines of the run's log file, or a note saying why there is none."""
    path = run.get("log_path")
    if not path:
        return "(no log file recorded)"
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.readlines()[-lines:]
    except FileNotFoundError:
        return "(no log yet)" if run.get("status") == "queued" else f"(log file {path} is not there)"
    except OSError as err:
        return f"(log file {path} cannot be read: {err})"
    return "".join(text).rstrip() or "(log is empty)"


def _first_lines(text: str, n: int = 12) -> str:
    lines = str(text).strip().splitlines()
    if len(lines) <= n:
        return "\n".join(lines)
    # a traceback's last lines say what went wrong
    return "\n".join(["…", *lines[-n:]])


# -- metrics ----------------------------------------------------------------------------------------------
def load_metrics(run_ids: Sequence[str], names: Iterable[str] | None = None, kind: str | None = None,
                 max_points: int | None = 2000):
    """Long metrics frame (run_id, kind, name, step, value), each curve downsampled on the server."""
    if not run_ids:
        import pandas as pd

        return pd.DataFrame(columns=["run_id", "kind", "name", "step", "value"])
    return get_store().metrics(list(run_ids), names=names, kind=kind, max_points=max_points)


def load_run_metrics(runs: Sequence[dict[str, Any]], names: Iterable[str] | None = None, kind: str | None = None,
                     max_points: int | None = 2000, live_key: str | None = None):
    """`load_metrics` for these runs, the finished ones from a cache: a finished run never changes
    (a resumed one is another attempt), so its curves are read once, not at every rerun of the page.
    With `live_key` (a live panel's), an active run's points are kept in the session under that key and
    each call reads only the rows written since the previous one (`live.LiveCurves`)."""
    import pandas as pd

    names = tuple(names) if names is not None else None
    done = tuple(sorted((r["id"], int(r.get("attempts") or 0)) for r in runs if r["status"] in FINAL))
    active = [r["id"] for r in runs if r["status"] not in FINAL]
    parts = [_finished_metrics(done, names, kind, max_points)] if done else []
    if active and live_key is None:
        parts.append(load_metrics(active, names=names, kind=kind, max_points=max_points))
    elif active:
        watched = st.session_state.setdefault(live_key, {})
        for run_id in active:
            run_curves = watched.setdefault(run_id, LiveCurves(run_id))
            run_curves.pull(get_store())
            parts.append(run_curves.view(max_points or LIVE_MAX_POINTS, names=names, kind=kind))
    return pd.concat(parts, ignore_index=True) if parts else load_metrics([])


def metrics_csv(run_ids: Sequence[str], labels: dict[str, str]) -> Callable[[], str]:
    """The CSV of these runs' raw metrics (`tables.metrics_csv`, one block per run under its label), as
    a function for `st.download_button` to call when the button is clicked: every raw row of a large
    selection is read then, not at each rerun of the page."""
    store, run_ids, labels = get_store(), list(run_ids), dict(labels)

    def build() -> str:
        full = store.metrics(run_ids)
        return tables.metrics_csv({labels[i]: full[full["run_id"] == i].drop(columns=["run_id"]) for i in run_ids})

    return build


@st.cache_data(max_entries=32, show_spinner=False)
def _finished_metrics(runs: tuple[tuple[str, int], ...], names: tuple[str, ...] | None, kind: str | None,
                      max_points: int | None):
    return load_metrics([run_id for run_id, _ in runs], names=names, kind=kind, max_points=max_points)


def metric_times(run_ids: Sequence[str]):
    """Wall-clock seconds of every logged (run, kind, step) since the run's first record
    (`Store.metric_times`)."""
    return get_store().metric_times(run_ids)


# -- view state in the URL ----------------------------------------------------------------------------------
def step_format(step: float) -> str:
    """A slider's printf format with as many decimals as its step: 5 (not 5.00) for a count, 0.025 (not
    0.03) for a step of 0.005."""
    decimals = f"{step:.10f}".rstrip("0").partition(".")[2]
    return f"%0.{len(decimals)}f"


class ViewParams:
    """Widgets whose values live in the URL query parameters, so a view can be shared and reloaded.

    Each widget reads its first value from `?name=...` (lists comma-separated, booleans 1/0), falls
    back to `default`, drops values that are no longer options, and `sync()` (call it last) writes the
    current values back into the URL. Widget keys are `<prefix>.<name>` in the session state.
    """

    def __init__(self, query_params: Any, prefix: str) -> None:
        self.query_params = query_params
        self.prefix = prefix
        self.values: dict[str, str] = {}

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def _prepare(self, name: str, decode: Callable[[str], Any], default: Any, valid: Callable[[Any], Any]) -> str:
        key = self.key(name)
        if key not in st.session_state:
            raw = self.query_params.get(name)
            value = default
            if raw is not None:
                try:
                    value = decode(raw)
                except ValueError:
                    value = default
            st.session_state[key] = value
        st.session_state[key] = valid(st.session_state[key])
        return key

    def multiselect(self, where: Any, label: str, name: str, options: Sequence[Any], *,
                    default: Sequence[Any] = (), format_func: Callable[[Any], str] = str) -> list[Any]:
        allowed = list(options)
        key = self._prepare(name, lambda raw: [v for v in raw.split(",") if v], list(default),
                            lambda vals: [v for v in vals if v in allowed])
        value = where.multiselect(label, allowed, key=key, format_func=format_func)
        self.values[name] = ",".join(str(v) for v in value)
        return value

    def selectbox(self, where: Any, label: str, name: str, options: Sequence[str], *, default: str,
                  format_func: Callable[[Any], str] = str) -> str:
        allowed = list(options)
        key = self._prepare(name, str, default, lambda v: v if v in allowed else default)
        value = where.selectbox(label, allowed, key=key, format_func=format_func)
        self.values[name] = str(value)
        return value

    def radio(self, where: Any, label: str, name: str, options: Sequence[str], *, default: str) -> str:
        allowed = list(options)
        key = self._prepare(name, str, default, lambda v: v if v in allowed else default)
        value = where.radio(label, allowed, key=key, horizontal=True)
        self.values[name] = str(value)
        return value

    def slider(self, where: Any, label: str, name: str, lo: float, hi: float, *, default: float,
               step: float) -> float:
        key = self._prepare(name, float, default, lambda v: min(max(float(v), lo), hi))
        value = where.slider(label, lo, hi, step=step, key=key, format=step_format(step))
        self.values[name] = f"{value:g}"
        return value

    def toggle(self, where: Any, label: str, name: str, *, default: bool = False, help: str | None = None) -> bool:
        key = self._prepare(name, lambda raw: raw in ("1", "true", "True"), default, bool)
        value = where.toggle(label, key=key, help=help)
        self.values[name] = "1" if value else "0"
        return value

    def text_input(self, where: Any, label: str, name: str, *, default: str = "") -> str:
        key = self._prepare(name, str, default, str)
        value = where.text_input(label, key=key)
        self.values[name] = value
        return value

    def sync(self) -> None:
        """Write the non-empty values into the URL (replacing the page's query parameters)."""
        wanted = {k: v for k, v in self.values.items() if v not in ("", None)}
        if dict(self.query_params.to_dict()) != wanted:
            self.query_params.from_dict(wanted)
