"""The store on a real PostgreSQL server: engines per process, small pools, the server's clock.

The backend-independent store tests (tests/test_store.py) run on PostgreSQL too, through their
parametrised `store` fixture; these are the PostgreSQL-only properties. Skipped without
SAMLAB_TEST_PG (see tests/pg_fixtures.py).
"""

from __future__ import annotations

import multiprocessing

import pytest
import sqlalchemy as sa

from samlab.runs import scheduler
from samlab.runs.store import Store
from tests.helpers import backdate_heartbeat
from tests.pg_fixtures import fresh_schema_url, require_pg

TZ_ERROR_S = 1800.0


@pytest.fixture
def pg_url() -> str:
    require_pg()
    with fresh_schema_url() as url:
        yield url


def _backend_pid(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def _child_writes(store: Store, run_id: str, queue) -> None:
    """In a forked child: the inherited Store must open its own connection, never the parent's."""
    queue.put(_backend_pid(store))
    store.flush(run_id, [("step", 1, "loss", 0.5, 0.0)])
    store.dispose()


def test_a_forked_child_gets_its_own_connections_and_leaves_the_parents_alone(pg_url, tmp_path):
    store = Store(pg_url, runs_root=tmp_path)
    (run_id,) = store.create_runs([{"kind": "train", "params": {}}])
    parent_pid = _backend_pid(store)  # a pooled connection, checked in, inherited by the fork
    pool = store.engine.pool
    assert pool.size() == 2 and pool._max_overflow == 2  # small pools: many workers share one server
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_writes, args=(store, run_id, queue))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) != parent_pid
    # the parent's pooled connection survived the child (same server backend, not a reconnect)
    assert _backend_pid(store) == parent_pid
    assert store.metrics([run_id])["value"].tolist() == [0.5]
    store.dispose()


def _with_timezone(url: str, zone: str) -> str:
    parsed = sa.make_url(url)
    options = parsed.query["options"] + f" -ctimezone={zone}"
    return parsed.update_query_dict({"options": options}).render_as_string(hide_password=False)


def test_heartbeats_and_staleness_use_the_server_clock_whatever_the_session_time_zone(pg_url, tmp_path):
    """Two clients in time zones 24 hours apart (UTC+14 and UTC-10) agree on every timestamp."""
    east = Store(_with_timezone(pg_url, "Pacific/Kiritimati"), runs_root=tmp_path)
    west = Store(_with_timezone(pg_url, "America/Adak"), runs_root=tmp_path)
    (run_id,) = east.create_runs([{"kind": "train", "params": {}}])
    assert east.claim(run_id, "east-host", "local") and east.start_run(run_id, 1, "east-host", "cpu")
    east.flush(run_id, [])
    # a time-zone mistake shifts by whole hours (14 - (-10) = 24 here): half an hour tells it from load
    skew = abs((east.server_now() - west.server_now()).total_seconds())
    assert skew < TZ_ERROR_S
    assert west.stale_runs(60) == []  # a fresh heartbeat from the other side of the date line
    assert scheduler.reconcile(west, stale_after_s=60) == []
    beat = west.get_run(run_id)["heartbeat_at"]
    assert abs((west.server_now() - beat).total_seconds()) < TZ_ERROR_S
    backdate_heartbeat(east, run_id, 7200)  # written in UTC+14, read in UTC-10: silent for two hours
    assert [r["id"] for r in west.stale_runs(3600)] == [run_id]
    failed = scheduler.reconcile(west, stale_after_s=3600)
    assert [rid for rid, _ in failed] == [run_id] and "database clock" in failed[0][1]
    east.dispose()
    west.dispose()
