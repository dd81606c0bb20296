"""Live panels: incremental points, a figure refreshed in place equals a fresh build, finished runs'
figures cached by run id, back-off, and the Train page's live feeds (the file a card's frame follows: only
new rows read, its figure equal to a fresh build, its writer stops when the run ends)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import figures, live, live_chart, plots, runs_view, tables
from samlab.config import preset
from samlab.reporting import RecordingReporter
from samlab.runs import curves
from tests.helpers import active_runs_frames, live_feeds, plotly_array, record_fragments
from tests.pg_fixtures import BACKENDS, store_on

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recorded():
    """A real tiny training run's config and metric rows, in the store's row format."""
    from samlab.train import run

    cfg = preset("digits-mlp", {"data.n_train": 96, "data.n_test": 64, "epochs": 3, "batch_size": 16, "seed": 0})
    reporter = RecordingReporter()
    result = run(cfg, reporter)
    t0 = time.time()
    rows = [(kind, step, name, float(value), t0 + 0.01 * i)
            for i, (kind, step, values) in enumerate(reporter.rows) for name, value in values.items()]
    return cfg, rows, result.summary


def _running(store, cfg, rows):
    (run_id,) = store.create_runs([{"kind": "train", "params": cfg.to_dict(), "name": "live"}])
    store.start_run(run_id, pid=os.getpid(), host="test-host", device="cpu")
    if rows:
        store.flush(run_id, rows, progress=0.5, message="half")
    return run_id


def _fresh_figure(store, run_id: str, cfg):
    """The panel built from scratch from every raw row of the run (no cache, no incremental read)."""
    raw = store.metrics([run_id])
    spe = tables.steps_per_epoch(cfg)
    return figures.run_panel_figure(tables.wide_metrics(raw, run_id, "step", spe=spe),
                                    tables.wide_metrics(raw, run_id, "epoch", spe=spe),
                                    task=tables.data_task(cfg), x="step", perturbs=plots.perturbs(cfg))


def test_incremental_pulls_and_an_in_place_refresh_equal_a_fresh_build(store_env, recorded):
    cfg, rows, _ = recorded
    run_id = _running(store_env, cfg, [])
    watched = live.LiveCurves(run_id)
    run = store_env.get_run(run_id)
    figure = None
    pulled, in_place, cuts = 0, 0, [len(rows) * k // 6 for k in range(1, 7)]
    for start, stop in zip([0, *cuts], cuts):
        store_env.flush(run_id, rows[start:stop])
        new = watched.pull(store_env)
        assert new == stop - start  # exactly the rows written since the last pull
        pulled += new
        before = figure
        figure = runs_view.panel_figure(run, watched.view(), figure)
        in_place += figure is before  # same layout, new data put in place (rebuilt when a series appears)
    assert watched.pull(store_env) == 0 and pulled == len(rows) and in_place >= 3
    assert figure.to_json() == _fresh_figure(store_env, run_id, cfg).to_json()


def test_a_finished_runs_cached_figure_equals_a_fresh_build(store_env, recorded):
    cfg, rows, summary = recorded
    run_id = _running(store_env, cfg, rows)
    store_env.finish_run(run_id, "completed", summary=summary)
    run = store_env.get_run(run_id)
    key = (run_id, run["finished_at"], run["attempts"])
    first = runs_view.finished_run_figure(*key)
    assert runs_view.finished_run_figure(*key) is first  # built once, then served from the cache
    assert first.to_json() == _fresh_figure(store_env, run_id, cfg).to_json()


def test_live_view_downsamples_a_long_curve_like_the_store(store_env):
    (run_id,) = store_env.create_runs([{"kind": "train", "params": {}, "name": "long"}])
    values = [((s * 37) % 101) / 7.0 for s in range(5000)]
    store_env.flush(run_id, [("step", s, "train_loss", v, 0.0) for s, v in enumerate(values)])
    watched = live.LiveCurves(run_id)
    watched.pull(store_env)
    shown = watched.view(max_points=400)
    stored = store_env.metrics([run_id], max_points=400)
    assert shown["step"].tolist() == stored["step"].tolist()
    assert shown["value"].tolist() == pytest.approx(stored["value"].tolist())
    assert shown["step"].tolist() == [s for s, _ in curves.downsample(list(enumerate(values)), 400)]


def test_backoff_doubles_after_quiet_refreshes_and_resets_on_news():
    backoff = live.Backoff()
    seen = [backoff.tick(False) for _ in range(3 * live.IDLE_TICKS)]
    assert seen[live.IDLE_TICKS - 1] == 2 * live.BASE_S and seen[-1] == 8 * live.BASE_S
    assert max(backoff.tick(False) for _ in range(20 * live.IDLE_TICKS)) == live.MAX_S
    assert backoff.tick(True) == live.BASE_S


def test_the_train_pages_live_card_follows_its_feed_without_script_runs_and_stops_when_its_run_ends(
        store_env, recorded, monkeypatch):
    cfg, rows, summary = recorded
    run_id = _running(store_env, cfg, rows)
    defined = record_fragments(monkeypatch)
    at = AppTest.from_file(str(ROOT / "pages" / "1_Train.py"), default_timeout=120)
    at.run()
    assert not at.exception
    assert [name for name, every in defined if every] == []  # no fragment refreshes while a run is watched
    (args,) = live_feeds(at)
    writer = runs_view.feed_writer(store_env.url)
    # the card's frame follows the run; the active runs' frame runs the page again when it ends
    assert args["feed"] == f"feeds/{writer.folder.name}/{run_id}.json" and not args["rerun_at_end"]
    assert args["progress"]["text"].startswith("running · 50% · half")
    (watch,) = active_runs_frames(at)
    watched = writer.folder / watch["feed"].rsplit("/", 1)[1]
    assert watch["active"] == [run_id] and json.loads(watched.read_text())["active"] == [run_id]
    feed = json.loads(writer.path(run_id).read_text())  # the file the frame fetches
    assert feed["version"] == args["version"] and not feed["final"] and feed["spec"] == args["spec"]
    assert json.loads(feed["spec"])["data"] == json.loads(live_chart.figure_json(
        _fresh_figure(store_env, run_id, cfg)))["data"]
    store_env.finish_run(run_id, "completed", summary=summary)
    writer.step(time.monotonic() + live.MAX_S)
    feed = json.loads(writer.path(run_id).read_text())
    assert feed["status"] == "completed" and feed["final"] and run_id not in writer.feeds  # no longer watched
    assert json.loads(watched.read_text())["active"] == []  # what makes the frame run the page again
    defined.clear()
    at.run()
    assert not at.exception
    assert [name for name, every in defined if every] == []
    assert live_feeds(at) == [] and [f["active"] for f in active_runs_frames(at)] == [[]]
    assert ":green[" in " ".join(e.label for e in at.expander)  # drawn as a finished card


def test_a_feed_changes_version_only_with_news_and_backs_off(store_env, recorded):
    cfg, rows, _ = recorded
    run_id = _running(store_env, cfg, [])
    writer = runs_view.feed_writer(store_env.url)
    first = dict(writer.watch(store_env.get_run(run_id)))
    assert first["spec"] is not None and json.loads(first["spec"])["data"][0]["x"] in ([], None)  # waiting axes
    now = time.monotonic()
    versions, intervals = [], []
    for _ in range(3 * live.IDLE_TICKS):  # nothing new: same version, slower and slower
        now += live.MAX_S
        writer.step(now)
        feed = json.loads(writer.path(run_id).read_text())
        versions.append(feed["version"]), intervals.append(feed["next_s"])
    assert set(versions) == {first["version"]} and intervals[-1] > live.BASE_S
    store_env.flush(run_id, rows[:5], progress=0.1, message="epoch 1")
    writer.step(now + live.MAX_S)
    feed = json.loads(writer.path(run_id).read_text())
    assert feed["version"] == first["version"] + 1 and feed["next_s"] == live.BASE_S
    assert feed["progress"]["fraction"] == pytest.approx(0.1)
    (other,) = store_env.create_runs([{"kind": "train", "params": cfg.to_dict(), "name": "other"}])
    writer.step(now + 2 * live.MAX_S)  # another run is no news of this one
    assert json.loads(writer.path(run_id).read_text())["version"] == first["version"] + 1
    assert writer.watch(store_env.get_run(other))["status"] == "queued"
    store_env.delete_run(other)  # a deleted run's last feed ends it (the page then drops its card)
    writer.step(now + 3 * live.MAX_S)
    feed = json.loads(writer.path(other).read_text())
    assert feed["status"] == "deleted" and feed["final"] and list(writer.feeds) == [run_id]
    writer.step(now + 3 * live.MAX_S + live.ENDED_KEEP_S + 1)
    assert not writer.path(other).exists()  # an ended run's file is removed after a while
    with pytest.raises(ValueError):
        writer.path("../app")


def test_the_active_runs_feed_follows_runs_started_elsewhere_until_its_lease_ends(store_env, recorded):
    cfg, _, summary = recorded
    writer = runs_view.feed_writer(store_env.url)
    now = time.monotonic()
    first = writer.watch_active(now)
    path = writer.folder / first["file"]
    assert first["active"] == [] and not first["final"] and json.loads(path.read_text()) == first
    writer.step(now + live.TICK_S)
    assert json.loads(path.read_text())["version"] == first["version"]  # nothing changed: the same feed
    (other,) = store_env.create_runs([{"kind": "train", "params": cfg.to_dict(), "name": "elsewhere"}])
    store_env.create_runs([{"kind": "hessian", "params": {}, "name": "another kind"}])
    writer.step(now + 2 * live.TICK_S)  # queued elsewhere: on the feed at the next tick
    feed = json.loads(path.read_text())
    assert feed["active"] == [other] and feed["version"] == first["version"] + 1
    store_env.start_run(other, pid=os.getpid(), host="here", device="cpu")
    writer.step(now + 3 * live.TICK_S)  # queued -> running: still active, no news
    assert json.loads(path.read_text())["version"] == feed["version"]
    store_env.finish_run(other, "completed", summary=summary)
    writer.step(now + 4 * live.TICK_S)
    assert json.loads(path.read_text())["active"] == []
    # a page run renews the lease; without one for ACTIVE_LEASE_S the feed ends (its frame runs the page
    # again, which starts a new feed under a new file)
    assert writer.watch_active(now + live.ACTIVE_LEASE_S / 2)["file"] == first["file"]
    writer.step(now + live.ACTIVE_LEASE_S)
    assert not json.loads(path.read_text())["final"]
    writer.step(now + 1.5 * live.ACTIVE_LEASE_S)
    assert json.loads(path.read_text())["final"] and writer.active is None
    renewed = writer.watch_active(now + 1.5 * live.ACTIVE_LEASE_S + 1)
    assert renewed["file"] != first["file"] and not renewed["final"]
    writer.step(now + 1.5 * live.ACTIVE_LEASE_S + live.ENDED_KEEP_S + 2)
    assert not path.exists()  # the ended feed's file is removed after a while
    writer.active = None


def test_the_feed_writers_thread_writes_the_new_points_by_itself_and_stops_with_nothing_to_watch(
        store_env, recorded, monkeypatch):
    cfg, rows, summary = recorded
    monkeypatch.setattr(live, "FEED_THREAD", True)
    run_id = _running(store_env, cfg, rows[:4])
    writer = live.FeedWriter(store_env, live_chart.feeds_folder(), progress=runs_view.ui.progress_text,
                             panel=runs_view._feed_panel, waiting=plots.waiting_panel_figure,
                             to_json=live_chart.figure_json, kind="train")
    try:
        start = writer.watch(store_env.get_run(run_id))["version"]
        store_env.flush(run_id, rows[4:], progress=0.9, message="nearly")
        deadline = time.monotonic() + 60
        while json.loads(writer.path(run_id).read_text())["version"] == start:
            assert time.monotonic() < deadline, "the thread did not write the new points"
            time.sleep(0.1)
        drawn = json.loads(json.loads(writer.path(run_id).read_text())["spec"])["data"]
        assert drawn == json.loads(live_chart.figure_json(_fresh_figure(store_env, run_id, cfg)))["data"]
        store_env.finish_run(run_id, "completed", summary=summary)
        while writer.thread is not None:  # the run ended: its last feed, then nothing to watch
            assert time.monotonic() < deadline, "the thread did not stop"
            time.sleep(0.1)
        assert json.loads(writer.path(run_id).read_text())["final"]
    finally:
        writer.feeds.clear()
        shutil.rmtree(writer.folder, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def any_store(request, tmp_path):
    """A store on SQLite and (when SAMLAB_TEST_PG names a server) on PostgreSQL."""
    with store_on(request.param, tmp_path) as store:
        yield store


def test_new_metrics_returns_each_row_once_in_written_order_among_other_runs_rows(any_store):
    store_env = any_store
    ids = store_env.create_runs([{"kind": "train", "params": {}, "name": n} for n in ("watched", "other")])
    written: list[tuple] = []
    cursor, got = None, []
    for flush in range(5):
        mine = [("step", 10 * flush + i, name, float(i) if i != 2 else None, 0.0)
                for i in range(4) for name in ("loss", "acc")] + ([("epoch", flush, "test_acc", 0.5, 0.0)])
        store_env.flush(ids[1], [("step", 10 * flush, "loss", 9.0, 0.0)])  # another run writes in between
        store_env.flush(ids[0], mine)
        written += [(k, n, s, float("nan") if v is None else v) for k, s, n, v, _ in mine]
        rows, cursor, replaced = store_env.new_metrics(ids[0], cursor)
        got += rows
        assert not replaced and store_env.new_metrics(ids[0], cursor) == ([], cursor, False)  # nothing new
    assert [r[:3] for r in got] == [r[:3] for r in written]
    assert [r[3] for r in got] == pytest.approx([r[3] for r in written], nan_ok=True)


@pytest.mark.parametrize("other_run_writes", [False, True])
def test_a_resumed_runs_rewritten_tail_replaces_the_points_a_live_view_had(any_store, other_run_writes):
    store_env = any_store
    run_id, other = store_env.create_runs([{"kind": "train", "params": {}, "name": n} for n in ("resumed", "o")])
    t0 = time.time()
    store_env.flush(run_id, [("step", s, name, float(s), t0 + s) for s in range(10) for name in ("loss", "lr")])
    if other_run_writes:  # rows above the run's: the rewrite gets new ids (else SQLite reuses the freed ones)
        store_env.flush(other, [("step", 0, "loss", 1.0, t0)])
    watched = live.LiveCurves(run_id)
    assert watched.pull(store_env) == 20
    # the resumed attempt goes back to its checkpoint at step 6 and writes steps 6… again
    t1 = time.time() + 100
    store_env.flush(run_id, [("step", s, name, -float(s), t1 + s) for s in range(6, 12) for name in ("loss", "lr")],
                    restart_from=[("step", "loss", 6), ("step", "lr", 6)])
    watched.pull(store_env)
    shown, fresh = watched.view(), store_env.metrics([run_id])
    for name in ("loss", "lr"):
        mine, stored = shown[shown["name"] == name], fresh[fresh["name"] == name]
        assert mine["step"].tolist() == stored["step"].tolist() == list(range(12))
        assert mine["value"].tolist() == stored["value"].tolist() == [*range(6), *(-s for s in range(6, 12))]


@pytest.mark.parametrize("n, max_points", [(5000, 400), (20000, 2000), (3000, 100), (500, 2000)])
def test_downsampled_arrays_equal_the_bucket_downsample(n, max_points):
    rng = np.random.default_rng(n)
    steps = np.sort(rng.choice(10 * n, n, replace=False)) + 7
    values = np.round(rng.normal(size=n), 1)  # many ties: the earliest step of an extreme is kept
    values[rng.random(n) < 0.05] = np.nan
    values[3], values[-2] = np.inf, -np.inf
    oracle = curves.downsample([(int(s), None if np.isnan(v) else float(v)) for s, v in zip(steps, values)],
                               max_points)
    shown_steps, shown_values = curves.downsample_arrays(steps, values, max_points)
    assert shown_steps.tolist() == [s for s, _ in oracle]
    assert shown_values.tolist() == pytest.approx([np.nan if v is None else v for _, v in oracle], nan_ok=True)


def count_curve_reads(monkeypatch) -> dict[str, list]:
    """Records every curve read of the store: `metrics` (run ids) and `new_metrics` (run id, rows)."""
    from samlab.runs.store import Store

    calls: dict[str, list] = {"metrics": [], "new_metrics": []}
    real_metrics, real_new = Store.metrics, Store.new_metrics

    def metrics(self, run_ids, *args, **kwargs):
        calls["metrics"].append(list(run_ids))
        return real_metrics(self, run_ids, *args, **kwargs)

    def new_metrics(self, run_id, cursor=None):
        out = real_new(self, run_id, cursor)
        calls["new_metrics"].append((run_id, len(out[0])))
        return out

    monkeypatch.setattr(Store, "metrics", metrics)
    monkeypatch.setattr(Store, "new_metrics", new_metrics)
    return calls


def test_train_page_reruns_read_no_rows_and_its_feed_only_new_ones(store_env, recorded, monkeypatch):
    cfg, rows, summary = recorded
    done = _running(store_env, cfg, rows)
    store_env.finish_run(done, "completed", summary=summary)
    active = _running(store_env, cfg, rows[: len(rows) // 2])
    calls = count_curve_reads(monkeypatch)
    at = AppTest.from_file(str(ROOT / "pages" / "1_Train.py"), default_timeout=120)
    at.run()
    assert not at.exception
    assert calls["new_metrics"] == [(active, len(rows) // 2)]  # the live feed: every row so far, once
    for _ in range(2):  # page runs read no curve: the feed is the server's, and the finished card is cached
        calls["metrics"].clear(), calls["new_metrics"].clear()
        at.run()
        assert not at.exception
        assert calls["metrics"] == [] and calls["new_metrics"] == []
    writer = runs_view.feed_writer(store_env.url)
    writer.step(time.monotonic() + live.MAX_S)  # nothing new: one read that returns nothing
    assert calls["new_metrics"] == [(active, 0)]
    store_env.flush(active, rows[len(rows) // 2:])
    calls["new_metrics"].clear()
    writer.step(time.monotonic() + 2 * live.MAX_S)
    assert calls["metrics"] == [] and calls["new_metrics"] == [(active, len(rows) - len(rows) // 2)]


def test_the_runs_page_reads_no_raw_rows_until_the_metrics_download_is_clicked(store_env, recorded, monkeypatch):
    import io

    import pandas as pd

    from dashboard import common as ui
    from samlab.runs.store import Store

    cfg, rows, summary = recorded
    ids = []
    for _ in range(3):
        ids.append(_running(store_env, cfg, rows))
        store_env.finish_run(ids[-1], "completed", summary=summary)
    raw_reads: list[list[str]] = []
    real = Store.metrics

    def metrics(self, run_ids, *args, **kwargs):
        if kwargs.get("max_points") is None:
            raw_reads.append(list(run_ids))
        return real(self, run_ids, *args, **kwargs)

    monkeypatch.setattr(Store, "metrics", metrics)
    at = AppTest.from_file(str(ROOT / "pages" / "2_Runs.py"), default_timeout=120)
    at.query_params["runs"] = ",".join(ids)
    at.run()
    assert not at.exception and raw_reads == []  # the page drew its curves from the buckets only
    labels = {i: f"run {n}" for n, i in enumerate(ids)}
    build = ui.metrics_csv(ids, labels)
    assert raw_reads == []  # deferred: nothing read until the download asks for it
    table = pd.read_csv(io.StringIO(build()))
    assert raw_reads == [ids]
    assert table.groupby("run").size().to_dict() == {label: len(rows) for label in labels.values()}


def test_hessian_trajectory_reads_a_training_runs_new_rows_only_and_a_finished_run_once(store_env, recorded,
                                                                                          monkeypatch):
    import json

    from samlab.runs.store import Store

    cfg, _, summary = recorded
    t0 = time.time()

    def trajectory_rows(steps, scale):
        return [("step", s, name, value, t0 + s) for s in steps
                for name, value in (("lambda_max", scale * (1 + s)), ("lr", 0.1), ("train_loss", 1.0 / (1 + s)))]

    done = _running(store_env, cfg, trajectory_rows(range(0, 40, 4), 2.0))
    store_env.finish_run(done, "completed", summary=summary)
    active = _running(store_env, cfg, trajectory_rows(range(0, 20, 4), 3.0))
    real_metrics = Store.metrics  # the oracle's reads are not counted
    calls = count_curve_reads(monkeypatch)
    at = AppTest.from_file(str(ROOT / "pages" / "3_Hessian.py"), default_timeout=120)
    at.run()
    at.multiselect(key="hessian.trajectory_runs").set_value([done, active]).run()
    assert not at.exception

    def drawn() -> dict[str, list[float]]:  # λ_max traces by legend name (the 2/η lines are named "2/η · …")
        (chart,) = [c for c in at.get("plotly_chart") if c.key == "hessian.trajectory"]
        spec = json.loads(chart.proto.spec)
        return {t["name"]: plotly_array(t["y"]) for t in spec["data"] if not t["name"].startswith("2/η")}

    def stored(run_id: str) -> list[float]:  # the oracle: every raw row of the run
        raw = real_metrics(store_env, [run_id], names=["lambda_max"], kind="step")
        return raw.sort_values("step")["value"].tolist()

    def check_drawn() -> None:
        shown = drawn()
        assert len(shown) == 2
        for run_id in (done, active):
            (values,) = [v for name, v in shown.items() if name.endswith(run_id[:6])]
            assert values == pytest.approx(stored(run_id))

    check_drawn()
    assert calls["new_metrics"] == [(active, 3 * 5)]  # the training run: every row so far, once
    assert calls["metrics"].count([done]) <= 1  # the finished run: read once, then cached
    for _ in range(2):  # reruns with nothing new: no curve read, no row
        calls["metrics"].clear(), calls["new_metrics"].clear()
        at.run()
        assert not at.exception
        assert calls["metrics"] == [] and calls["new_metrics"] == [(active, 0)]
    store_env.flush(active, trajectory_rows(range(20, 32, 4), 3.0))
    calls["new_metrics"].clear()
    at.run()
    assert calls["metrics"] == [] and calls["new_metrics"] == [(active, 3 * 3)]
    check_drawn()


def test_the_live_chart_folder_holds_its_own_files_and_the_installed_plotly_js(monkeypatch, tmp_path):
    from dashboard import live_chart

    monkeypatch.setattr(live_chart.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = live_chart.component_dir()
    for name in live_chart.FILES:
        assert (folder / name).read_bytes() == (live_chart.FRONTEND / name).read_bytes()
    assert (folder / "plotly.min.js").read_bytes() == live_chart.plotly_js().read_bytes()
    assert folder.stat().st_mode & 0o755 == 0o755  # readable by every user's dashboard
    assert live_chart.component_dir() == folder  # built once: the second call finds it
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # and no half-built folder is left
