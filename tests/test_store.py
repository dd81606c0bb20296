"""Run store: schema and migrations, filtered reads, server-side downsampling, concurrent writers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from samlab.runs.curves import LEVEL_WIDTHS
from samlab.runs.store import SCHEMA_VERSION, Store
from samlab.runs.worker import StoreReporter
from tests.helpers import backdate_heartbeat
from tests.pg_fixtures import BACKENDS, store_on

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path: Path) -> Store:
    """The same tests on SQLite and (when SAMLAB_TEST_PG names a server) on PostgreSQL."""
    with store_on(request.param, tmp_path) as st:
        yield st


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}")


def _make_runs(store: Store, n: int, **spec) -> list[str]:
    return store.create_runs([{"kind": "train", "params": {"i": i}, "name": f"run {i}", **spec}
                              for i in range(n)])


def test_fresh_store_is_wal_versioned_and_puts_run_folders_beside_the_file(sqlite_store, tmp_path):
    store = sqlite_store
    assert store.schema_version() == SCHEMA_VERSION
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    (run_id,) = _make_runs(store, 1)
    run = store.get_run(run_id)
    assert run["status"] == "queued" and run["params"] == {"i": 0}
    assert Path(run["workdir"]) == tmp_path / "runs" / run_id
    assert run["log_path"].endswith(f"{run_id}/run.log")


def _write_v1_file(path: Path) -> None:
    """The v1 layout, written by hand: train runs with a `config` column, long-format metrics."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.executescript(textwrap.dedent("""
        CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE runs (
            id VARCHAR(32) PRIMARY KEY, name VARCHAR(200) NOT NULL DEFAULT '', group_id VARCHAR(32),
            config TEXT NOT NULL, status VARCHAR(16) NOT NULL, created_at DATETIME, started_at DATETIME,
            finished_at DATETIME, heartbeat_at DATETIME, pid INTEGER, host VARCHAR(255),
            device VARCHAR(255), error TEXT, summary TEXT, workdir TEXT, log_path TEXT,
            checkpoint_path TEXT);
        CREATE TABLE metrics (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id VARCHAR(32) NOT NULL,
            kind VARCHAR(16) NOT NULL, step INTEGER NOT NULL, name VARCHAR(64) NOT NULL, value FLOAT,
            time FLOAT);
        INSERT INTO runs (id, name, config, status, created_at, summary, workdir)
            VALUES ('oldrun000001', 'old', '{"seed": 3}', 'completed', '2024-01-02 03:04:05.000000',
                    '{"final_test_acc": 0.9}', '/somewhere/oldrun000001');
        INSERT INTO metrics (run_id, kind, step, name, value, time)
            VALUES ('oldrun000001', 'epoch', 0, 'test_acc', 0.5, 1.0),
                   ('oldrun000001', 'epoch', 1, 'test_acc', 0.9, 2.0);
    """))
    con.commit()
    con.close()


def test_opening_a_v1_file_migrates_it_and_keeps_its_data(tmp_path):
    path = tmp_path / "old" / "samlab.db"
    _write_v1_file(path)
    store = Store(f"sqlite:///{path}")
    assert store.schema_version() == SCHEMA_VERSION
    run = store.get_run("oldrun")  # unique prefix
    assert run["id"] == "oldrun000001" and run["kind"] == "train" and run["params"] == {"seed": 3}
    assert run["summary"] == {"final_test_acc": 0.9} and run["cancel_requested"] is False
    frame = store.metrics(["oldrun000001"])
    assert frame["value"].tolist() == [0.5, 0.9]
    # v4: the old curves were folded into buckets (a 1-point budget reads the coarsest bucket)
    assert store.metrics(["oldrun000001"], max_points=1)["value"].tolist() == [0.5, 0.9]
    # the migrated file takes the new columns and tables
    (new_id,) = store.create_runs([{"kind": "msharp", "params": {"m": [1, 2]}, "cache_key": "k"}])
    store.add_artifact("oldrun000001", "log", "/x/run.log")
    assert store.find_cached("k")["id"] == new_id
    assert [a["name"] for a in store.artifacts("oldrun000001")] == ["log"]
    indexes = {ix["name"] for ix in sa.inspect(store.engine).get_indexes("metrics")}
    assert "ix_metrics_run_kind_name_step" in indexes
    # v3: the old run was numbered first, the new one after it
    assert run["seq"] == 1 and store.get_run(new_id)["seq"] == 2
    assert [r["id"] for r in store.list_runs()] == [new_id, "oldrun000001"]
    # v4: search columns and the searches table
    assert run["study"] is None and run["trial"] is None and run["stop_reason"] is None
    (trial_run,) = store.create_runs([{"kind": "train", "params": {}, "study": "s-m8", "trial": 3}])
    assert [r["id"] for r in store.trial_runs("s-m8")] == [trial_run]
    store.create_search("gs", "a search", {"ms": [8]})
    assert store.get_search("gs")["spec"] == {"ms": [8]} and store.get_search("gs")["status"] == "running"
    # a second open of the migrated file is a no-op
    assert Store(f"sqlite:///{path}").get_run(new_id)["kind"] == "msharp"


def test_opening_a_v4_store_builds_the_buckets_of_its_curves(store):
    ids = _make_runs(store, 2)
    rng = np.random.default_rng(1)
    for run_id in ids:
        store.flush(run_id, [("step", s, "loss", float(rng.normal()), 0.0) for s in range(900)])
    expected = store.metrics(ids, max_points=300)
    with store.engine.begin() as conn:  # back to the v4 layout: no bucket or curve table
        conn.execute(sa.text("DROP TABLE metric_buckets"))
        conn.execute(sa.text("DROP TABLE metric_curves"))
        conn.execute(sa.text("UPDATE meta SET value = '4' WHERE key = 'schema_version'"))
    store.dispose()
    reopened = Store(store.url)  # a real file (or server schema) opened by a newer samlab
    assert reopened.schema_version() == SCHEMA_VERSION == 6
    pd.testing.assert_frame_equal(reopened.metrics(ids, max_points=300), expected)
    assert len(expected) < 300 * 2 and len(reopened.metrics(ids)) == 1800
    reopened.dispose()


def test_opening_a_v5_store_counts_its_curves(store):
    ids = _make_runs(store, 3)
    rng = np.random.default_rng(2)
    store.flush(ids[0], [("step", s, "loss", float(rng.normal()), 0.0) for s in range(0, 5000, 2)]
                + [("epoch", e, "test_acc", float("nan") if e == 1 else 0.1 * e, 0.0) for e in range(4)])
    store.flush(ids[1], [("step", s, "loss", float(s), 0.0) for s in range(40)]
                + [("step", s, "gnorm", float("nan"), 0.0) for s in range(5)])  # no finite value at all
    store.flush(ids[1], [("step", s, "loss", -float(s), 0.0) for s in range(30, 35)],
                restart_from=[("step", "loss", 30)])
    reads = {mp: store.metrics(ids, max_points=mp) for mp in (50, 100, 400, 3000)}
    names = store.metric_names(ids)
    with store.engine.begin() as conn:  # back to the v5 layout: no curve table
        conn.execute(sa.text("DROP TABLE metric_curves"))
        conn.execute(sa.text("UPDATE meta SET value = '5' WHERE key = 'schema_version'"))
    store.dispose()
    reopened = Store(store.url)
    assert reopened.schema_version() == SCHEMA_VERSION == 6
    for run_id in ids:
        _assert_store_matches_raw(reopened, run_id)
    for mp, expected in reads.items():
        pd.testing.assert_frame_equal(reopened.metrics(ids, max_points=mp), expected)
    assert reopened.metric_names(ids) == names == [("epoch", "test_acc"), ("step", "gnorm"), ("step", "loss")]
    # the migrated curves take new writes (version 1 rows, writers' memory starts empty)
    memory: dict = {}
    reopened.flush(ids[1], [("step", s, "loss", 1.0, 0.0) for s in range(35, 90)], open_curves=memory)
    reopened.flush(ids[1], [("step", s, "loss", 2.0, 0.0) for s in range(90, 95)], open_curves=memory)
    _assert_store_matches_raw(reopened, ids[1])
    reopened.dispose()


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "samlab.db"
    Store(f"sqlite:///{path}").schema_version()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="schema version 99, newer"):
        Store(f"sqlite:///{path}").list_runs()


def test_runs_created_in_one_batch_or_within_a_millisecond_keep_their_order(store):
    first = store.create_runs([{"kind": "train", "params": {"i": i}} for i in range(5)])
    second = store.create_runs([{"kind": "train", "params": {"i": 5}}])
    seqs = [store.get_run(i)["seq"] for i in first + second]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    assert [r["id"] for r in store.list_runs()] == list(reversed(first + second))
    assert [r["id"] for r in store.runs_with_status(["queued"])] == first + second


def test_list_filters_counts_and_ids(store):
    a = _make_runs(store, 3, group_id="g1")
    b = store.create_runs([{"kind": "hessian", "params": {"top": 5}, "name": "Curvature of x"}])
    assert store.claim(a[0], "h", "local") and store.start_run(a[0], 1, "h", "cpu")
    assert store.finish_run(a[0], "completed", summary={"acc": 1.0})
    assert store.request_cancel(a[1]) == "cancelled"
    assert {r["id"] for r in store.list_runs(group="g1")} == set(a)
    assert [r["id"] for r in store.list_runs(kind="hessian")] == b
    assert [r["id"] for r in store.list_runs(text="curvature")] == b
    assert [r["id"] for r in store.list_runs(status=["completed", "cancelled"], limit=1)] in ([a[0]], [a[1]])
    assert store.count_by_status() == {"queued": 2, "running": 0, "completed": 1, "failed": 0,
                                       "cancelled": 1, "diverged": 0, "pruned": 0}
    assert store.count_by_status(kind="hessian")["queued"] == 1
    assert store.list_runs()[0]["id"] == b[0]  # newest first
    with pytest.raises(ValueError, match="status"):
        store.list_runs(status="bogus")
    with pytest.raises(ValueError, match="limit"):
        store.list_runs(limit=0)
    with pytest.raises(ValueError, match="run_id: no run"):
        store.get_run("zzz")


def test_lifecycle_transitions_are_conditional(store):
    (run_id,) = _make_runs(store, 1)
    assert store.claim(run_id, "h", "local")
    assert not store.claim(run_id, "h", "local")  # a second launcher loses
    assert not store.start_run(run_id, 42, "other-host", "cpu")  # claimed for another host
    assert store.start_run(run_id, 42, "h", "cpu")
    assert store.request_cancel(run_id) == "requested"
    assert store.flush(run_id, [], 0.5, "half") is True  # the worker reads the flag back
    assert store.finish_run(run_id, "cancelled")
    assert not store.finish_run(run_id, "completed")  # already final
    assert store.request_cancel(run_id) == ""
    assert store.requeue(run_id, resume=True)
    run = store.get_run(run_id)
    assert run["status"] == "queued" and run["resume_requested"] and not run["cancel_requested"]
    with pytest.raises(ValueError, match="status"):
        store.finish_run(run_id, "queued")


def test_heartbeats_use_the_database_clock(store):
    (run_id,) = _make_runs(store, 1)
    store.claim(run_id, "h", "local")
    store.start_run(run_id, 1, "h", "cpu")
    backdate_heartbeat(store, run_id, 7200)
    old = store.get_run(run_id)["heartbeat_at"]
    t0 = store.server_now()
    store.flush(run_id, [])
    beat = store.get_run(run_id)["heartbeat_at"]
    assert old < t0 <= beat <= store.server_now()  # the flush wrote the database's time, not the old beat
    assert store.stale_runs(3600) == []
    backdate_heartbeat(store, run_id, 7200)  # then silent for two hours
    assert [r["id"] for r in store.stale_runs(3600)] == [run_id]


def _m4_oracle(curve: pd.DataFrame, width: int) -> list[tuple[int, float]]:
    """The documented downsampling of one curve, computed with pandas on its raw rows: per bucket of
    `width` steps the first, smallest, largest and last finite point (ties: the earliest step)."""
    finite = curve[curve["value"].notna()]
    out: set[tuple[int, float]] = set()
    for _, group in finite.groupby(finite["step"] // width, sort=True):
        group = group.sort_values("step", kind="stable")
        lo = group.loc[group["value"] == group["value"].min()].iloc[0]
        hi = group.loc[group["value"] == group["value"].max()].iloc[0]
        for row in (group.iloc[0], lo, hi, group.iloc[-1]):
            out.add((int(row["step"]), float(row["value"])))
    return sorted(out)


def _assert_points(frame: pd.DataFrame, expected: list[tuple[int, float]]) -> None:
    assert frame["step"].tolist() == [step for step, _ in expected]
    assert frame["value"].tolist() == pytest.approx([value for _, value in expected])


def _bucket_oracle(points: pd.DataFrame) -> dict[tuple[str, str, int, int], dict[str, float]]:
    """Every bucket of these raw rows (columns kind, name, step, value) at every level, with pandas:
    count, first and last point by step, smallest and largest value (ties: the earliest step)."""
    out = {}
    finite = points[points["value"].notna()].sort_values(["kind", "name", "step"], kind="stable")
    for level, width in enumerate(LEVEL_WIDTHS):
        for (kind, name, index), group in finite.groupby([finite["kind"], finite["name"], finite["step"] // width]):
            lo = group.loc[group["value"] == group["value"].min()].iloc[0]
            hi = group.loc[group["value"] == group["value"].max()].iloc[0]
            out[(kind, name, level, int(index))] = {
                "n": len(group), "first_step": int(group["step"].iloc[0]), "first_value": group["value"].iloc[0],
                "last_step": int(group["step"].iloc[-1]), "last_value": group["value"].iloc[-1],
                "min_step": int(lo["step"]), "min_value": lo["value"], "max_step": int(hi["step"]),
                "max_value": hi["value"]}
    return out


def _assert_store_matches_raw(store: Store, run_id: str) -> None:
    """The run's bucket and curve rows, read with SQL, equal what its raw rows give (pandas oracle)."""
    raw = store.metrics([run_id])
    with store.engine.connect() as conn:
        stored = {(r.kind, r.name, r.level, r.bucket): {k: v for k, v in r._mapping.items() if k not in
                  ("run_id", "kind", "name", "level", "bucket")}
                  for r in conn.execute(sa.text("SELECT * FROM metric_buckets WHERE run_id = :r"), {"r": run_id})}
        counted = {(r.kind, r.name): dict(r._mapping) for r in conn.execute(
            sa.text("SELECT * FROM metric_curves WHERE run_id = :r AND rows > 0"), {"r": run_id})}
    expected = _bucket_oracle(raw)
    assert stored.keys() == expected.keys()
    for key, bucket in expected.items():
        assert stored[key] == pytest.approx(bucket), key
    assert set(counted) == set(zip(raw["kind"], raw["name"]))
    for (kind, name), row in counted.items():
        curve = raw[(raw.kind == kind) & (raw.name == name)]
        finite = curve[curve["value"].notna()]
        assert (row["rows"], row["n"]) == (len(curve), len(finite))
        for level, width in enumerate(LEVEL_WIDTHS):
            assert row[f"buckets_{level}"] == (finite["step"] // width).nunique()


def _finest_width(n_steps_span: int, max_points: int) -> int:
    return next(w for w in LEVEL_WIDTHS if (n_steps_span // w + 1) * 4 <= max_points)


def test_downsampled_curve_keeps_first_last_and_every_buckets_extremes(store):
    ids = _make_runs(store, 2)
    rng = np.random.default_rng(0)
    rows = {ids[0]: [], ids[1]: []}
    for step in range(0, 3000, 3):
        rows[ids[0]].append(("step", step, "loss", float(rng.normal()), 0.0))
        rows[ids[0]].append(("step", step, "acc", float("nan") if step % 300 == 0 else float(rng.random()), 0.0))
    for step in range(5, 80):
        rows[ids[1]].append(("step", step, "loss", float(step) ** 0.5, 0.0))
    for run_id, run_rows in rows.items():  # written in uneven flushes, as a worker does
        for start in range(0, len(run_rows), 37):
            store.flush(run_id, run_rows[start:start + 37])
    raw = store.metrics(ids)
    assert len(raw) == 2 * 1000 + 75 and raw["value"].isna().sum() == 10  # NaN kept as missing
    small = store.metrics(ids, names=["loss", "acc"], kind="step", max_points=200)
    width = _finest_width(3000, 200)
    assert width == 64
    for name in ("loss", "acc"):
        curve = raw[(raw.run_id == ids[0]) & (raw.name == name)]
        got = small[(small.run_id == ids[0]) & (small.name == name)]
        assert len(got) <= 200
        _assert_points(got, _m4_oracle(curve, width))
        finite = curve[curve["value"].notna()]
        assert got["step"].iloc[0] == finite["step"].iloc[0] and got["step"].iloc[-1] == finite["step"].iloc[-1]
        assert got["value"].iloc[[0, -1]].tolist() == pytest.approx(finite["value"].iloc[[0, -1]].tolist())
    # a curve shorter than max_points comes back point for point
    short = store.metrics([ids[1]], max_points=500)
    assert short["step"].tolist() == list(range(5, 80))
    assert store.metric_names(ids) == [("step", "acc"), ("step", "loss")]


def test_an_incremental_read_returns_exactly_the_new_points(store):
    (run_id,) = _make_runs(store, 1)
    store.flush(run_id, [("step", s, "loss", 1.0 / (s + 1), 0.0) for s in range(10)]
                + [("epoch", 0, "test_acc", 0.5, 0.0)])
    seen, cursor, replaced = store.new_metrics(run_id)
    assert not replaced and len(seen) == 11
    assert store.new_metrics(run_id, cursor) == ([], cursor, False)
    # a later flush: new steps, and a new curve whose first point is at a step already seen
    store.flush(run_id, [("step", s, "loss", 1.0 / (s + 1), 0.0) for s in range(10, 14)]
                + [("epoch", 1, "test_acc", 0.6, 0.0), ("step", 9, "lambda_max", 3.0, 0.0)])
    new, _, replaced = store.new_metrics(run_id, cursor)
    assert not replaced
    assert sorted((k, n, step) for k, n, step, _ in new) == (
        [("epoch", "test_acc", 1), ("step", "lambda_max", 9)] + [("step", "loss", s) for s in range(10, 14)])
    # old + new is the full read, row for row
    both = pd.DataFrame(seen + new, columns=["kind", "name", "step", "value"]).assign(run_id=run_id)
    both = both[["run_id", "kind", "name", "step", "value"]].sort_values(["run_id", "kind", "name", "step"],
                                                                          ignore_index=True)
    full = store.metrics([run_id]).sort_values(["run_id", "kind", "name", "step"], ignore_index=True)
    pd.testing.assert_frame_equal(both, full, check_dtype=False)


def test_buckets_follow_a_resumed_run_that_rewrites_its_tail(store):
    (run_id,) = _make_runs(store, 1)
    store.flush(run_id, [("step", s, "loss", float((s * 7) % 11), 0.0) for s in range(0, 700)])
    store.flush(run_id, [("step", s, "loss", -float(s), 0.0) for s in range(600, 650)],
                restart_from=[("step", "loss", 600)])
    raw = store.metrics([run_id])
    assert raw["step"].tolist() == list(range(650))
    got = store.metrics([run_id], max_points=400)
    _assert_points(got, _m4_oracle(raw, _finest_width(650, 400)))


def test_latest_metrics_restart_and_delete(store, tmp_path):
    ids = _make_runs(store, 2)
    store.flush(ids[0], [("epoch", e, "test_acc", 0.1 * e, 0.0) for e in range(5)])
    store.flush(ids[1], [("epoch", 0, "test_acc", 0.3, 0.0), ("epoch", 0, "test_loss", 2.0, 0.0)])
    assert store.latest_metrics(ids) == {ids[0]: {"test_acc": pytest.approx(0.4)},
                                         ids[1]: {"test_acc": 0.3, "test_loss": 2.0}}
    # a resumed run writes epochs 3.. again: the old tail is replaced, nothing duplicated
    store.flush(ids[0], [("epoch", 3, "test_acc", 0.7, 0.0)], restart_from=[("epoch", "test_acc", 3)])
    assert store.metrics([ids[0]])["value"].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.7])
    store.add_artifact(ids[0], "log", "x")
    removed = store.delete_run(ids[0])
    assert removed["id"] == ids[0]
    assert store.metrics([ids[0]]).empty and store.artifacts(ids[0]) == []
    assert store.metrics([ids[0]]).dtypes.tolist() == [object, object, object, "int64", "float64"]
    assert [r["id"] for r in store.list_runs()] == [ids[1]]
    store.claim(ids[1], "h", "local")
    with pytest.raises(ValueError, match="cancel it before deleting"):
        store.delete_run(ids[1])


WRITER = textwrap.dedent("""
    import sys
    from samlab.runs.store import Store
    from samlab.runs.worker import StoreReporter
    url, run_id, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store(url)
    reporter = StoreReporter(store, run_id, flush_s=0.02)
    reporter.start()
    for step in range(n):
        reporter.metrics("step", step, {"a": float(step), "b": -float(step)})
        if step % 50 == 0:
            reporter.progress(step, n, "writing")
    reporter.close()
    print("errors", reporter.flush_errors)
""")


def test_eight_processes_write_concurrently_without_loss_or_lock_errors(store):
    ids = _make_runs(store, 8)
    n = 800
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, store.url, run_id, str(n)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for run_id in ids]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "errors 0" in out and "locked" not in err
    frame = store.metrics(ids)
    assert len(frame) == 8 * n * 2
    counts = frame.groupby(["run_id", "name"]).size()
    assert (counts == n).all()
    for run_id in ids:
        a = frame[(frame.run_id == run_id) & (frame.name == "a")]
        assert a["step"].tolist() == list(range(n)) and a["value"].tolist() == [float(s) for s in range(n)]


def test_groups_name_each_group_by_its_first_run_newest_group_first(store):
    first = store.create_runs([{"kind": "train", "params": {"i": i}, "name": f"alpha · {i}", "group_id": "ga"}
                               for i in range(2)])
    _make_runs(store, 1)  # no group: not listed
    store.create_runs([{"kind": "hessian", "params": {}, "name": "beta · h", "group_id": "gb"}])
    assert len(first) == 2
    assert store.groups() == [("gb", "beta · h"), ("ga", "alpha · 0")]
    assert store.groups(kind="train") == [("ga", "alpha · 0")]


def test_metric_times_are_seconds_since_each_runs_first_record(store):
    ids = _make_runs(store, 2)
    store.flush(ids[0], [("step", 1, "train_loss", 1.0, 100.0), ("step", 1, "lr", 0.1, 100.5),
                         ("step", 2, "train_loss", 0.5, 103.0)])
    store.flush(ids[1], [("epoch", 1, "test_acc", 0.5, 50.0), ("epoch", 2, "test_acc", 0.6, 60.0)])
    frame = store.metric_times(ids).sort_values(["run_id", "kind", "step"])
    got = {(r.run_id, r.kind, int(r.step)): float(r.time) for r in frame.itertuples()}
    assert got == {(ids[0], "step", 1): 0.0, (ids[0], "step", 2): 3.0,
                   (ids[1], "epoch", 1): 0.0, (ids[1], "epoch", 2): 10.0}


def _flush_in_chunks(store: Store, run_id: str, rows: list, memory: dict | None, size: int) -> None:
    for start in range(0, len(rows), size):
        store.flush(run_id, rows[start:start + size], open_curves=memory)


def _bucket_reads(store: Store, write) -> int:
    """How many SELECTs on metric_buckets `write()` sends."""
    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", record)
    try:
        write()
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", record)
    return sum(s.lstrip().upper().startswith("SELECT") and "metric_buckets" in s for s in statements)


def test_a_writers_memory_of_its_buckets_gives_the_buckets_a_fresh_fold_gives(store):
    """Flushes that skip reading their open buckets (the writer remembers them) write the same buckets
    as the raw rows give, across uneven flushes, NaN, a curve that steps back, another writer of the
    same run, and a resumed tail."""
    ids = _make_runs(store, 2)
    rng = np.random.default_rng(3)
    rows = []
    for step in range(0, 2500):
        rows.append(("step", step, "loss", float(rng.normal()), 0.0))
        rows.append(("step", step, "acc", float("nan") if step % 97 == 0 else float(rng.random()), 0.0))
        if step % 300 == 299:  # a curve logged late, at steps already passed
            rows += [("step", s, "lambda_max", float(rng.random()), 0.0) for s in range(step - 299, step, 50)]
    memory: dict = {}
    _flush_in_chunks(store, ids[0], rows[:3000], memory, 41)
    _flush_in_chunks(store, ids[1], rows[:3000], None, 41)  # no memory: every flush reads its buckets
    assert {key[0] for key in memory} == {ids[0]} and len(memory) == 3
    _assert_store_matches_raw(store, ids[0])
    _assert_store_matches_raw(store, ids[1])
    # an extending flush with memory reads no bucket back; without, it reads the ones it touches
    extend = [("step", s, "loss", 0.5, 0.0) for s in range(1495, 1499)]
    assert _bucket_reads(store, lambda: store.flush(ids[0], extend, open_curves=memory)) == 0
    assert _bucket_reads(store, lambda: store.flush(ids[1], extend)) == 1
    rows = [r for r in rows if not (r[2] == "loss" and 1495 <= r[1] < 1499)]
    # another writer extends the curve ahead (its version moves on): the first writer's next flushes
    # must read back, and learn the other's buckets as the curve's last ones
    store.flush(ids[0], [("step", s, "loss", 10.0 + s, 0.0) for s in range(5000, 5030)])
    _flush_in_chunks(store, ids[0], rows[3000:4000], memory, 57)
    _assert_store_matches_raw(store, ids[0])
    # the writer's own resumed tail (restart_from cuts the curve, then the flush writes it again)
    store.flush(ids[0], [("step", s, "loss", -float(s), 0.0) for s in range(1000, 1100)],
                restart_from=[("step", "loss", 1000)], open_curves=memory)
    _flush_in_chunks(store, ids[0], [("step", s, "loss", float(s % 13), 0.0) for s in range(1100, 1400)], memory, 64)
    _assert_store_matches_raw(store, ids[0])
    loss = store.metrics([ids[0]], names=["loss"])
    assert loss["step"].tolist() == list(range(1400))
    frame = store.metrics(ids, max_points=300)
    assert not frame.empty and (frame.groupby(["run_id", "kind", "name"]).size() <= 300).all()


def test_a_resumed_worker_rewrites_its_tail_into_correct_buckets(store):
    """Two real StoreReporters, as a worker and its resumed successor use them: the second starts
    without memory, cuts each curve where it writes it again, and its buckets still equal the raw rows'."""
    (run_id,) = _make_runs(store, 1)
    first = StoreReporter(store, run_id, flush_s=60)
    for step in range(700):
        first.metrics("step", step, {"loss": float((step * 7) % 11), "acc": step / 700})
        if step % 90 == 0:
            first.flush()
    first.close()
    second = StoreReporter(store, run_id, flush_s=60, resume=True)
    for step in range(600, 900):
        second.metrics("step", step, {"loss": -float(step), "acc": float(step % 5)})
        if step % 70 == 0:
            second.flush()
    second.close()
    raw = store.metrics([run_id])
    assert raw.groupby("name")["step"].apply(list).to_dict() == {"acc": list(range(900)), "loss": list(range(900))}
    assert raw[(raw.name == "loss") & (raw.step >= 600)]["value"].tolist() == [-float(s) for s in range(600, 900)]
    _assert_store_matches_raw(store, run_id)


@pytest.mark.parametrize("max_points", [3, 40, 130, 400, 700, 5000])
def test_the_level_read_is_the_finest_that_fits(sqlite_store, max_points):
    """Against a brute-force count over the raw rows: a curve with at most max_points finite values
    comes point for point; else the finest level whose buckets (4 points each) fit, else the coarsest."""
    store = sqlite_store
    ids = _make_runs(store, 3)
    rng = np.random.default_rng(max_points)
    steps = {ids[0]: range(0, 3000), ids[1]: sorted(rng.choice(200_000, 600, replace=False)), ids[2]: range(7, 400, 3)}
    for run_id, run_steps in steps.items():
        _flush_in_chunks(store, run_id, [("step", int(s), "loss", float(rng.normal()), 0.0) for s in run_steps],
                         {}, 113)
    raw = store.metrics(ids)
    got = store.metrics(ids, max_points=max_points)
    for run_id in ids:
        curve = raw[raw.run_id == run_id]
        read = got[got.run_id == run_id]
        if len(curve) <= max_points:
            assert read["step"].tolist() == curve["step"].tolist()
            continue
        counts = [(curve["step"] // w).nunique() for w in LEVEL_WIDTHS]
        width = next((w for w, n in zip(LEVEL_WIDTHS, counts) if 4 * n <= max_points), LEVEL_WIDTHS[-1])
        _assert_points(read, _m4_oracle(curve, width))
