"""The run store: runs, their metrics and artifacts in one SQLAlchemy database (SQLite by default).

One code path serves any SQLAlchemy URL. The default is SQLite at `data/runs/samlab.db` under the
repository (resolved from this file, not the working directory); `SAMLAB_STORE` selects another URL.
SQLite is opened in WAL mode with a busy timeout (set on every new connection), so many worker
processes can write while the dashboard reads. Engines are created lazily inside the process that uses
them and re-created after a fork, so no connection ever crosses a process boundary.

All timestamps (created, started, finished, heartbeat, cancel request) come from the database server's
clock (`utcnow()` below, naive UTC), so staleness is judged on one clock even across hosts.

Public API (stable; the dashboard, CLI, worker and scheduler use only this):

    default_url() -> str                       SAMLAB_STORE, else sqlite:///<repo>/data/runs/samlab.db
    open_store(url=None) -> Store              one Store per URL per process
    Store.url, Store.runs_root                 where run folders go by default (<db dir> for SQLite files)

    writers
    Store.create_runs(specs) -> list[str]      specs: dicts with kind, params, name, group_id, cache_key
    Store.claim(run_id, host, executor) -> bool          queued -> running (for a launcher; atomic)
    Store.start_run(run_id, pid, host, device) -> bool   worker takes the run (queued, or claimed for it)
    Store.set_launch(run_id, pid, executor_ref)          launcher records the process it started
    Store.assign_executor(run_ids, executor, ref) -> int queued runs: the backend job that will run them
    Store.flush(run_id, rows, progress=None, message=None, result=None, restart_from=(), open_curves=None)
        -> bool   one transaction: metric rows [(kind, step, name, value, time)], heartbeat, progress,
        partial result; returns the run's cancel_requested flag. open_curves: a dict the writer keeps
        between its flushes (what it knows of its curves' last buckets), so a flush need not read them
    Store.finish_run(run_id, status, *, result, summary, error, checkpoint_path) -> bool
    Store.fail_run(run_id, reason, *, only_if_running=True) -> bool
    Store.request_cancel(run_id) -> str        "cancelled" (was queued), "requested" (running) or ""
    Store.requeue(run_id, *, resume) -> bool   cancelled/failed -> queued
    Store.record_error(run_id, text)
    Store.add_artifact(run_id, name, path)
    Store.delete_run(run_id) -> dict           rows only; returns the run (jobs.delete removes files)

    readers
    Store.get_run(run_id) -> dict              ValueError naming run_id when absent; prefixes accepted
    Store.resolve_id(prefix) -> str
    Store.list_runs(status=None, kind=None, group=None, text=None, limit=100, offset=0) -> list[dict]
    Store.count_by_status(kind=None, group=None, text=None) -> dict[str, int]
    Store.find_cached(cache_key) -> dict | None          newest queued/running/completed run with the key
    Store.metric_names(run_ids) -> list[tuple[kind, name]]
    Store.metrics(run_ids, names=None, kind=None, max_points=None) -> pandas.DataFrame
        columns run_id, kind, name, step, value; with max_points a curve longer than that comes from
        its write-time buckets (samlab.runs.curves: first, min, max and last point of each)
    Store.new_metrics(run_id, cursor=None) -> (rows, cursor, replaced)
        the rows (kind, name, step, value) of one run written since the read that returned `cursor`, in
        the order they were written (a live view's refresh reads only what is new); replaced: a resumed
        run's rewrite removed what the cursor pointed to, and these are all the run's rows
    Store.latest_metrics(run_ids, names=None, kind="epoch") -> dict[run_id, dict[name, value]]
    Store.artifacts(run_id) -> list[dict]
    Store.stale_runs(stale_after_s) -> list[dict]        running, heartbeat older than that (server clock)
    Store.runs_with_status(statuses, host=None) -> list[dict]
    Store.server_now() -> datetime

A run dict has the columns of `runs` below with JSON columns decoded (params, result, summary).

Schema history (SCHEMA_VERSION, `meta.schema_version`); opening an older file migrates it in place:
    v1  runs (train runs only: config JSON, status, timestamps, pid/host/device, error, heartbeat, paths,
        summary) and metrics (long format).
    v2  runs.config renamed params; runs gain kind, cache_key, progress, progress_message,
        cancel_requested(+_at), resume_requested, result, executor, executor_ref, attempts; artifacts table;
        indexes for status/kind/group/cache_key and a covering (run_id, kind, name, step, value).
    v3  runs gain seq, the creation order (the clock's millisecond cannot order runs created together);
        older rows are numbered by (created_at, id).
    v4  runs gain study, trial (the Optuna study and trial number of a search's run) and stop_reason (why
        a stop was requested: "pruned" ends the run as `pruned`); the searches table (one row per
        adaptive search: its spec, status, driver process and heartbeat, cancel flag).
    v5  metric_buckets: every curve downsampled at write time (samlab.runs.curves), filled from the
        existing metrics when an older file is opened.
    v6  metric_curves: one row per curve (rows, finite values, buckets per level, a write version), so a
        read chooses each curve's level without counting buckets; filled from the existing tables.

Searches (samlab.runs.search): Store.create_search(search_id, name, spec), get_search(id),
list_searches(), search_heartbeat(id, pid, host, status=None, error=None),
request_search_cancel(id) -> bool, reopen_search(id) -> bool, trial_runs(study) -> list[Run].
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import expression

from samlab.runs import curves

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 6
STATUSES = ("queued", "running", "completed", "failed", "cancelled", "diverged", "pruned")
ACTIVE = ("queued", "running")
FINAL = ("completed", "failed", "cancelled", "diverged", "pruned")
STOP_REASONS = ("cancelled", "pruned")  # why a stop was requested; "pruned": a search's pruner stopped it
SEARCH_STATUSES = ("running", "completed", "cancelled", "failed")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DB = REPO_ROOT / "data" / "runs" / "samlab.db"
BUSY_TIMEOUT_MS = 30_000


# -- server clock ------------------------------------------------------------------------------------
class utcnow(expression.FunctionElement):  # noqa: N801 (SQL function name)
    """The database server's current UTC time as a naive timestamp (millisecond resolution on SQLite)."""

    type = sa.DateTime()
    inherit_cache = True


@compiles(utcnow)
def _utcnow_default(element, compiler, **kw):
    return "CURRENT_TIMESTAMP"


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element, compiler, **kw):
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


@compiles(utcnow, "postgresql")
def _utcnow_postgresql(element, compiler, **kw):
    return "(CURRENT_TIMESTAMP AT TIME ZONE 'UTC')"


# -- schema ------------------------------------------------------------------------------------------
metadata = sa.MetaData()
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

meta_table = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

runs_table = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False, server_default="train"),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    sa.Column("group_id", sa.String(32)),
    sa.Column("params", sa.Text, nullable=False),
    sa.Column("cache_key", sa.String(64)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime),
    sa.Column("seq", sa.BigInteger),  # creation order: one more than the largest so far
    sa.Column("started_at", sa.DateTime),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("heartbeat_at", sa.DateTime),
    sa.Column("pid", sa.Integer),
    sa.Column("host", sa.String(255)),
    sa.Column("device", sa.String(255)),
    sa.Column("executor", sa.String(32)),
    sa.Column("executor_ref", sa.String(255)),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("progress", sa.Float),
    sa.Column("progress_message", sa.Text),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("cancel_requested_at", sa.DateTime),
    sa.Column("resume_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("result", sa.Text),
    sa.Column("summary", sa.Text),
    sa.Column("workdir", sa.Text),
    sa.Column("log_path", sa.Text),
    sa.Column("checkpoint_path", sa.Text),
    sa.Column("study", sa.String(200)),  # the Optuna study of a search's run
    sa.Column("trial", sa.Integer),  # its trial number in that study
    sa.Column("stop_reason", sa.String(16)),  # why a stop was requested (STOP_REASONS)
    sa.Index("ix_runs_status", "status"),
    sa.Index("ix_runs_kind", "kind"),
    sa.Index("ix_runs_group", "group_id"),
    sa.Index("ix_runs_cache_key", "cache_key"),
    sa.Index("ix_runs_created", "created_at"),
    sa.Index("ix_runs_seq", "seq"),
    sa.Index("ix_runs_study_trial", "study", "trial"),
)

metrics_table = sa.Table(
    "metrics",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(32), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("value", sa.Float),  # NULL for NaN (SQLite stores NaN as NULL)
    sa.Column("time", sa.Float),  # writer's unix time of the measurement
    # covering (value included): curve reads never touch the table rows
    sa.Index("ix_metrics_run_kind_name_step", "run_id", "kind", "name", "step", "value"),
)

def _curve_key() -> list[sa.Column]:
    """The primary key columns naming one curve (new Column objects for each table)."""
    return [sa.Column("run_id", sa.String(32), primary_key=True), sa.Column("kind", sa.String(16), primary_key=True),
            sa.Column("name", sa.String(64), primary_key=True)]


# The downsampled curves (samlab.runs.curves): one row per (curve, level, bucket), kept by `flush`.
buckets_table = sa.Table(
    "metric_buckets",
    metadata,
    *_curve_key(),
    sa.Column("level", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("bucket", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("n", sa.Integer, nullable=False),
    *[sa.Column(f"{edge}_{part}", sa.Integer if part == "step" else sa.Float, nullable=False)
      for edge in ("first", "last", "min", "max") for part in ("step", "value")],
)
_EDGE_COLUMNS = [c for c in buckets_table.c if c.name.endswith(("_step", "_value"))]  # edge_points' order

# One row per curve, kept by `flush` beside its buckets: how many rows and finite values it has and how
# many buckets at each level, so a read picks a curve's level from one row, and a version bumped by every
# write (a writer's OpenCurve is valid while the version is the one it wrote).
curves_table = sa.Table(
    "metric_curves",
    metadata,
    *_curve_key(),
    sa.Column("rows", sa.Integer, nullable=False),  # metric rows, NaN ones included
    sa.Column("n", sa.Integer, nullable=False),  # finite values (the points in the buckets)
    sa.Column("version", sa.Integer, nullable=False),
    *[sa.Column(f"buckets_{level}", sa.Integer, nullable=False) for level in range(len(curves.LEVEL_WIDTHS))],
)
_LEVEL_COLUMNS = [f"buckets_{level}" for level in range(len(curves.LEVEL_WIDTHS))]

artifacts_table = sa.Table(
    "artifacts",
    metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime),
)

searches_table = sa.Table(
    "searches",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # also the group id of its runs
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),  # JSON of samlab.search.SearchSpec.to_dict()
    sa.Column("status", sa.String(16), nullable=False),  # SEARCH_STATUSES
    sa.Column("created_at", sa.DateTime),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("heartbeat_at", sa.DateTime),  # the driver's last tick
    sa.Column("pid", sa.Integer),  # the driver process
    sa.Column("host", sa.String(255)),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("error", sa.Text),
)

_JSON_COLUMNS = ("params", "result", "summary")
_LIST_COLUMNS = [c for c in runs_table.c if c.name not in ("result",)]


class Run(TypedDict, total=False):
    """A run as the store returns it: one row of `runs`, JSON columns decoded (`list_runs` leaves out
    `result`, which only `get_run` and `find_cached` read)."""

    id: str
    kind: str  # a task kind of samlab.tasks: "train", "hessian", ...
    name: str
    group_id: str | None  # the sweep (or batch) the run belongs to
    params: dict[str, Any]
    cache_key: str | None
    status: str  # one of STATUSES
    created_at: datetime | None
    seq: int | None
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    pid: int | None
    host: str | None
    device: str | None
    executor: str | None
    executor_ref: str | None
    attempts: int
    error: str | None
    progress: float | None
    progress_message: str | None
    cancel_requested: bool
    cancel_requested_at: datetime | None
    resume_requested: bool
    result: dict[str, Any] | None
    summary: dict[str, Any] | None
    workdir: str | None
    log_path: str | None
    checkpoint_path: str | None
    study: str | None  # the Optuna study of a search's run
    trial: int | None  # its trial number
    stop_reason: str | None  # STOP_REASONS


# -- migrations --------------------------------------------------------------------------------------
def _migrate_1_to_2(conn: sa.Connection) -> None:
    conn.execute(sa.text("ALTER TABLE runs RENAME COLUMN config TO params"))
    added = {
        "kind": "VARCHAR(32) NOT NULL DEFAULT 'train'",
        "cache_key": "VARCHAR(64)",
        "executor": "VARCHAR(32)",
        "executor_ref": "VARCHAR(255)",
        "attempts": "INTEGER NOT NULL DEFAULT 0",
        "progress": "FLOAT",
        "progress_message": "TEXT",
        "cancel_requested": "BOOLEAN NOT NULL DEFAULT FALSE",
        "cancel_requested_at": "TIMESTAMP",
        "resume_requested": "BOOLEAN NOT NULL DEFAULT FALSE",
        "result": "TEXT",
    }
    for column, ddl in added.items():
        conn.execute(sa.text(f"ALTER TABLE runs ADD COLUMN {column} {ddl}"))
    artifacts_table.create(conn, checkfirst=True)
    for table in (runs_table, metrics_table):
        for index in table.indexes:
            if index.name not in V3_INDEXES | V4_INDEXES:
                index.create(conn, checkfirst=True)


V3_INDEXES = {"ix_runs_seq"}


def _migrate_2_to_3(conn: sa.Connection) -> None:
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN seq BIGINT"))
    conn.execute(sa.text(
        "UPDATE runs SET seq = (SELECT COUNT(*) FROM runs AS r2 WHERE r2.created_at < runs.created_at "
        "OR (r2.created_at = runs.created_at AND r2.id <= runs.id))"
    ))
    for index in runs_table.indexes:
        if index.name in V3_INDEXES:
            index.create(conn, checkfirst=True)


V4_INDEXES = {"ix_runs_study_trial"}


def _migrate_3_to_4(conn: sa.Connection) -> None:
    for column, ddl in {"study": "VARCHAR(200)", "trial": "INTEGER", "stop_reason": "VARCHAR(16)"}.items():
        conn.execute(sa.text(f"ALTER TABLE runs ADD COLUMN {column} {ddl}"))
    for index in runs_table.indexes:
        if index.name in V4_INDEXES:
            index.create(conn, checkfirst=True)
    searches_table.create(conn, checkfirst=True)


def _migrate_4_to_5(conn: sa.Connection) -> None:
    buckets_table.create(conn, checkfirst=True)
    m = metrics_table.c
    for run_id in conn.execute(sa.select(m.run_id).distinct()).scalars().all():  # one run in memory at a time
        rows = conn.execute(sa.select(m.kind, m.name, m.step, m.value).where(m.run_id == run_id)
                            .order_by(m.kind, m.name, m.step)).all()
        by_curve: dict[tuple[str, str], list[tuple[int, float | None]]] = {}
        for kind, name, step, value in rows:
            by_curve.setdefault((kind, name), []).append((step, value))
        for (kind, name), points in by_curve.items():
            _insert_buckets(conn, (run_id, kind, name), points)


def _insert_buckets(conn: sa.Connection, curve: tuple[str, str, str] | None,
                    points: list[tuple[int, float | None]], from_step: int | None = None) -> None:
    """Fold a curve's points into its buckets at every level (only the buckets that hold `from_step`
    and later ones when given) and insert them."""
    if curve is None:
        return
    run_id, kind, name = curve
    rows = []
    for level, width in enumerate(curves.LEVEL_WIDTHS):
        chosen = points if from_step is None else [p for p in points if p[0] >= from_step // width * width]
        rows += [{"run_id": run_id, "kind": kind, "name": name, "level": level, "bucket": index,
                  **bucket.as_row()} for index, bucket in curves.fold(chosen, width).items()]
    if rows:
        conn.execute(sa.insert(buckets_table), rows)


def _migrate_5_to_6(conn: sa.Connection) -> None:
    curves_table.create(conn, checkfirst=True)
    rows = list(_count_curves(conn, (), ()).values())
    for chunk in _chunks(rows, 1000):
        conn.execute(sa.insert(curves_table), chunk)


def _count_curves(conn: sa.Connection, metric_cond: Sequence[Any], bucket_cond: Sequence[Any]
                  ) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The metric_curves rows (version 1) of the curves matching these filters, counted from the
    metrics and the buckets themselves."""
    m, b = metrics_table.c, buckets_table.c
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    query = sa.select(m.run_id, m.kind, m.name, sa.func.count()).where(*metric_cond).group_by(
        m.run_id, m.kind, m.name)
    for run_id, kind, name, n_rows in conn.execute(query):
        out[(run_id, kind, name)] = {"run_id": run_id, "kind": kind, "name": name, "rows": int(n_rows),
                                     "n": 0, "version": 1, **dict.fromkeys(_LEVEL_COLUMNS, 0)}
    query = sa.select(b.run_id, b.kind, b.name, b.level, sa.func.count(), sa.func.sum(b.n)).where(
        *bucket_cond).group_by(b.run_id, b.kind, b.name, b.level)
    for run_id, kind, name, level, n_buckets, n_points in conn.execute(query):
        row = out[(run_id, kind, name)]
        row[_LEVEL_COLUMNS[level]] = int(n_buckets)
        row["n"] = int(n_points)
    return out


MIGRATIONS = {2: _migrate_1_to_2, 3: _migrate_2_to_3, 4: _migrate_3_to_4, 5: _migrate_4_to_5,
              6: _migrate_5_to_6}  # target version -> step from the version before


# -- helpers -----------------------------------------------------------------------------------------
def default_url() -> str:
    """The store URL: `SAMLAB_STORE` if set, else the repository's SQLite file."""
    return os.environ.get("SAMLAB_STORE") or f"sqlite:///{DEFAULT_DB}"


def display_url(url: str) -> str:
    """A store URL with any password masked: safe to show on a page, in a log or a screenshot."""
    return sa.make_url(url).render_as_string(hide_password=True)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _decode(row: sa.Row) -> Run:
    out = dict(row._mapping)
    for key in _JSON_COLUMNS:
        if key in out:
            out[key] = _loads(out[key])
    if "cancel_requested" in out:
        out["cancel_requested"] = bool(out["cancel_requested"])
    if "resume_requested" in out:
        out["resume_requested"] = bool(out["resume_requested"])
    return out  # type: ignore[return-value]


def _nan_to_null(value: float | None) -> float | None:
    """NaN is stored as NULL on every backend (SQLite does so itself; PostgreSQL would keep NaN and
    poison the server-side means of downsampled reads)."""
    return None if value is None or value != value else value


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def new_id() -> str:
    """A short random run id (12 hex digits); unique enough for millions of runs, safe in paths."""
    return uuid.uuid4().hex[:12]


def _set_sqlite_pragmas(dbapi_connection, connection_record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    """A run store at one SQLAlchemy URL. Cheap to construct; the engine is made on first use."""

    def __init__(self, url: str | None = None, *, runs_root: str | Path | None = None) -> None:
        self.url = url or default_url()
        self.runs_root = Path(runs_root) if runs_root else _default_runs_root(self.url)
        self._engine: Engine | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    # -- engine ----------------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """This process's engine (re-created after a fork: connections never cross processes)."""
        with self._lock:
            if self._engine is None or self._pid != os.getpid():
                if self._engine is not None:  # inherited through a fork: drop the parent's
                    self._engine.dispose(close=False)  # connections without closing them for it
                self._engine = self._make_engine()
                self._pid = os.getpid()
                self._ensure_schema()
            return self._engine

    def _make_engine(self) -> Engine:
        url = sa.make_url(self.url)
        if url.get_backend_name() == "sqlite":
            if url.database and url.database != ":memory:":
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
            sa.event.listen(engine, "connect", _set_sqlite_pragmas)
            return engine
        return sa.create_engine(url, pool_size=2, max_overflow=2, pool_pre_ping=True)

    def _ensure_schema(self) -> None:
        # Several processes may open a fresh file at once: retry when another one created it first.
        for attempt in range(5):
            try:
                self._create_or_migrate()
                return
            except (sa.exc.OperationalError, sa.exc.IntegrityError, sa.exc.ProgrammingError):
                if attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def _create_or_migrate(self) -> None:
        engine = self._engine
        inspector = sa.inspect(engine)
        tables = set(inspector.get_table_names())
        if "runs" not in tables:
            with engine.begin() as conn:
                metadata.create_all(conn)
                conn.execute(sa.insert(meta_table).values(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        version = self._read_version(engine, tables)
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"store: {self.url} has schema version {version}, newer than this samlab understands "
                f"({SCHEMA_VERSION}); upgrade samlab to open it"
            )
        if version < SCHEMA_VERSION:
            with engine.begin() as conn:
                conn.execute(sa.update(meta_table).where(meta_table.c.key == "schema_version")
                             .values(value=str(version)))  # a write first: take the write lock now
                current = int(conn.execute(sa.select(meta_table.c.value)
                                           .where(meta_table.c.key == "schema_version")).scalar_one())
                for target in range(current + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[target](conn)
                conn.execute(sa.update(meta_table).where(meta_table.c.key == "schema_version")
                             .values(value=str(SCHEMA_VERSION)))

    @staticmethod
    def _read_version(engine: Engine, tables: set[str]) -> int:
        if "meta" not in tables:
            return 1
        with engine.connect() as conn:
            value = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
            ).scalar_one_or_none()
        return int(value) if value is not None else 1

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
            ).scalar_one())

    def dispose(self) -> None:
        if self._engine is not None and self._pid == os.getpid():
            self._engine.dispose()
        self._engine = None

    # -- writers ---------------------------------------------------------------------------------
    def create_runs(self, specs: Sequence[dict[str, Any]]) -> list[str]:
        """Insert queued runs in one transaction; each spec has kind, params and optionally name,
        group_id, cache_key, workdir, study and trial (a search's run). Returns the new ids in order."""
        rows = []
        for spec in specs:
            run_id = new_id()
            workdir = Path(spec.get("workdir") or self.runs_root / run_id)
            rows.append({
                "id": run_id,
                "kind": spec["kind"],
                "name": spec.get("name") or "",
                "group_id": spec.get("group_id"),
                "params": _dumps(spec["params"]),
                "cache_key": spec.get("cache_key"),
                "status": "queued",
                "workdir": str(workdir),
                "log_path": str(workdir / "run.log"),
                "study": spec.get("study"),
                "trial": spec.get("trial"),
            })
        if rows:
            # seq from a subquery inside each INSERT: the rows of a batch, and of later batches, count up
            next_seq = sa.select(sa.func.coalesce(sa.func.max(runs_table.c.seq), 0) + 1).scalar_subquery()
            with self.engine.begin() as conn:
                conn.execute(sa.insert(runs_table).values(created_at=utcnow(), seq=next_seq), rows)
        return [r["id"] for r in rows]

    def claim(self, run_id: str, host: str, executor: str) -> bool:
        """Atomically take a queued run for launching (queued -> running); False if someone else did."""
        with self.engine.begin() as conn:
            res = conn.execute(
                sa.update(runs_table)
                .where(runs_table.c.id == run_id, runs_table.c.status == "queued")
                .values(status="running", host=host, executor=executor, pid=None, error=None,
                        started_at=utcnow(), heartbeat_at=utcnow(), finished_at=None,
                        attempts=runs_table.c.attempts + 1, progress_message="launching")
            )
            return res.rowcount == 1

    def assign_executor(self, run_ids: Sequence[str], executor: str, executor_ref: str) -> int:
        """Record which backend and job will run these queued runs (before the job is submitted, so a
        launcher that dies in between leaves the reference behind); returns how many were queued."""
        c = runs_table.c
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(runs_table).where(c.id.in_(list(run_ids)), c.status == "queued")
                               .values(executor=executor, executor_ref=executor_ref))
            return res.rowcount

    def set_launch(self, run_id: str, pid: int | None, executor_ref: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(runs_table)
                .where(runs_table.c.id == run_id, runs_table.c.status == "running",
                       sa.or_(runs_table.c.pid.is_(None), runs_table.c.pid == pid))
                .values(pid=pid, executor_ref=executor_ref)
            )

    def start_run(self, run_id: str, pid: int, host: str, device: str) -> bool:
        """The worker takes its run: a queued run, or one claimed for it on this host."""
        c = runs_table.c
        claimed_for_me = sa.and_(c.status == "running", c.host == host,
                                 sa.or_(c.pid.is_(None), c.pid == pid))
        with self.engine.begin() as conn:
            res = conn.execute(
                sa.update(runs_table)
                .where(c.id == run_id, sa.or_(c.status == "queued", claimed_for_me))
                .values(status="running", pid=pid, host=host, device=device, error=None,
                        started_at=sa.func.coalesce(c.started_at, utcnow()), heartbeat_at=utcnow(),
                        finished_at=None, progress_message="started")
            )
            return res.rowcount == 1

    def flush(self, run_id: str, rows: Sequence[tuple[str, int, str, float | None, float]],
              progress: float | None = None, message: str | None = None,
              result: dict[str, Any] | None = None,
              restart_from: Sequence[tuple[str, str, int]] = (),
              open_curves: dict[tuple[str, str, str], curves.OpenCurve] | None = None) -> bool:
        """Metric rows, heartbeat, progress and a partial result in one transaction; returns the
        run's cancel_requested flag. `restart_from` (kind, name, step) first drops those curves' rows
        from that step on (a resumed run writing them again).

        `open_curves` is a writer's memory of its curves between flushes ((run_id, kind, name) ->
        curves.OpenCurve), updated once the transaction commits: with it a flush that only extends a
        curve does not read its buckets back. An entry is used only while the curve's version in the
        store is the one it recorded, so another writer or a cut tail makes this flush read the
        buckets it touches, as it does without it."""
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if progress is not None:
            values["progress"] = progress
        if message is not None:
            values["progress_message"] = message
        if result is not None:
            values["result"] = _dumps(result)
        m = metrics_table.c
        opened: dict[tuple[str, str, str], curves.OpenCurve] = {}
        with self.engine.begin() as conn:
            # the heartbeat first: a write takes SQLite's write lock (PostgreSQL: the run's row lock,
            # which orders two writers of one run) before anything is read
            conn.execute(sa.update(runs_table).where(runs_table.c.id == run_id).values(**values))
            for kind, name, step in restart_from:
                conn.execute(sa.delete(metrics_table).where(
                    m.run_id == run_id, m.kind == kind, m.name == name, m.step >= step))
            for kind, name, step in restart_from:
                _rebuild_buckets(conn, run_id, kind, name, step)
            if rows:
                conn.execute(sa.insert(metrics_table), [
                    {"run_id": run_id, "kind": k, "step": s, "name": n, "value": _nan_to_null(v), "time": t}
                    for k, s, n, v, t in rows
                ])
                opened = _add_to_buckets(conn, run_id, rows, open_curves or {})
            flag = conn.execute(
                sa.select(runs_table.c.cancel_requested).where(runs_table.c.id == run_id)
            ).scalar_one_or_none()
        if open_curves is not None:  # committed: the writer's memory follows the store
            open_curves.update(opened)
        return bool(flag)

    def finish_run(self, run_id: str, status: str, *, result: dict[str, Any] | None = None,
                   summary: dict[str, Any] | None = None, error: str | None = None,
                   checkpoint_path: str | None = None) -> bool:
        """Record the final status of a running run (False if it was no longer running)."""
        if status not in FINAL:
            raise ValueError(f"status: must be one of {', '.join(FINAL)} (got {status!r})")
        values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "heartbeat_at": utcnow(),
                                  "error": error, "cancel_requested": False, "resume_requested": False}
        if result is not None:
            values["result"] = _dumps(result)
        if summary is not None:
            values["summary"] = _dumps(summary)
        if checkpoint_path is not None:
            values["checkpoint_path"] = checkpoint_path
        if status == "completed":
            values["progress"] = 1.0
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(runs_table)
                               .where(runs_table.c.id == run_id, runs_table.c.status == "running")
                               .values(**values))
            return res.rowcount == 1

    def fail_run(self, run_id: str, reason: str, *, only_if_running: bool = True,
                 status: str = "failed", only_if_active: bool = False) -> bool:
        """Mark a run failed (or another final status) with a reason, unless it already ended
        (`only_if_active`: a queued run too, e.g. one whose job died before starting it)."""
        cond = [runs_table.c.id == run_id]
        if only_if_active:
            cond.append(runs_table.c.status.in_(ACTIVE))
        elif only_if_running:
            cond.append(runs_table.c.status == "running")
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(runs_table).where(*cond).values(
                status=status, error=reason, finished_at=utcnow(), cancel_requested=False,
                resume_requested=False))
            return res.rowcount == 1

    def request_cancel(self, run_id: str, reason: str = "cancelled") -> str:
        """Queued -> ended at once ("cancelled"); running -> flag set ("requested"); else "".

        `reason` is recorded as the run's stop_reason and names the final status of a queued run;
        "pruned" (a search's pruner) makes a stopped run end as `pruned` instead of `cancelled`."""
        if reason not in STOP_REASONS:
            raise ValueError(f"reason: must be one of {', '.join(STOP_REASONS)} (got {reason!r})")
        c = runs_table.c
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(runs_table).where(c.id == run_id, c.status == "queued").values(
                status=reason, finished_at=utcnow(), error=f"{reason} before it started", stop_reason=reason))
            if res.rowcount == 1:
                return "cancelled"
            res = conn.execute(sa.update(runs_table).where(c.id == run_id, c.status == "running").values(
                cancel_requested=True, stop_reason=sa.func.coalesce(c.stop_reason, reason),
                cancel_requested_at=sa.func.coalesce(c.cancel_requested_at, utcnow())))
            return "requested" if res.rowcount == 1 else ""

    def stopped_status(self, run_id: str) -> str:
        """The final status of a run that stopped on request: "pruned" when a pruner asked, else "cancelled"."""
        with self.engine.connect() as conn:
            reason = conn.execute(sa.select(runs_table.c.stop_reason)
                                  .where(runs_table.c.id == run_id)).scalar_one_or_none()
        return "pruned" if reason == "pruned" else "cancelled"

    def requeue(self, run_id: str, *, resume: bool) -> bool:
        """A cancelled or failed run goes back to the queue (resume=True continues from its state)."""
        c = runs_table.c
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(runs_table)
                               .where(c.id == run_id, c.status.in_(("cancelled", "failed")))
                               .values(status="queued", resume_requested=resume, cancel_requested=False,
                                       cancel_requested_at=None, stop_reason=None, pid=None, executor_ref=None,
                                       finished_at=None, error=None, progress_message="queued to resume"))
            return res.rowcount == 1

    def record_error(self, run_id: str, text: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.update(runs_table).where(runs_table.c.id == run_id).values(error=text))

    def add_artifact(self, run_id: str, name: str, path: str) -> None:
        a = artifacts_table.c
        with self.engine.begin() as conn:
            conn.execute(sa.delete(artifacts_table).where(a.run_id == run_id, a.name == name))
            conn.execute(sa.insert(artifacts_table).values(run_id=run_id, name=name, path=str(path),
                                                           created_at=utcnow()))

    def delete_run(self, run_id: str) -> Run:
        """Delete a run's rows (metrics, artifacts, run); refuses a running run. Returns the run."""
        run = self.get_run(run_id)
        if run["status"] == "running":
            raise ValueError(f"run_id: run {run['id']} is running; cancel it before deleting")
        with self.engine.begin() as conn:
            conn.execute(sa.delete(metrics_table).where(metrics_table.c.run_id == run["id"]))
            conn.execute(sa.delete(buckets_table).where(buckets_table.c.run_id == run["id"]))
            conn.execute(sa.delete(curves_table).where(curves_table.c.run_id == run["id"]))
            conn.execute(sa.delete(artifacts_table).where(artifacts_table.c.run_id == run["id"]))
            conn.execute(sa.delete(runs_table).where(runs_table.c.id == run["id"],
                                                     runs_table.c.status != "running"))
        return run

    # -- searches --------------------------------------------------------------------------------
    def create_search(self, search_id: str, name: str, spec: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.insert(searches_table).values(id=search_id, name=name, spec=_dumps(spec),
                                                          status="running", created_at=utcnow()))

    def get_search(self, search_id: str) -> dict[str, Any]:
        """A search's row (spec decoded); ValueError naming the id when absent."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(searches_table).where(searches_table.c.id == search_id)).first()
        if row is None:
            raise ValueError(f"search_id: no search {search_id!r} in the store {self.url}")
        out = dict(row._mapping)
        out["spec"] = _loads(out["spec"])
        out["cancel_requested"] = bool(out["cancel_requested"])
        return out

    def list_searches(self) -> list[dict[str, Any]]:
        """Every search (id, name, status, created_at), newest first."""
        s = searches_table.c
        query = sa.select(s.id, s.name, s.status, s.created_at).order_by(s.created_at.desc(), s.id)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def search_heartbeat(self, search_id: str, pid: int, host: str, *, status: str | None = None,
                         error: str | None = None) -> bool:
        """The driver's tick: its pid, host and heartbeat (and a final status); returns the cancel flag."""
        values: dict[str, Any] = {"pid": pid, "host": host, "heartbeat_at": utcnow()}
        if status is not None:
            if status not in SEARCH_STATUSES:
                raise ValueError(f"status: must be one of {', '.join(SEARCH_STATUSES)} (got {status!r})")
            values |= {"status": status, "error": error,
                       "finished_at": None if status == "running" else utcnow()}
        s = searches_table.c
        with self.engine.begin() as conn:
            conn.execute(sa.update(searches_table).where(s.id == search_id).values(**values))
            flag = conn.execute(sa.select(s.cancel_requested).where(s.id == search_id)).scalar_one_or_none()
        return bool(flag)

    def request_search_cancel(self, search_id: str) -> bool:
        """Ask a running search's driver to stop; False when the search is not running."""
        s = searches_table.c
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(searches_table).where(s.id == search_id, s.status == "running")
                               .values(cancel_requested=True))
            return res.rowcount == 1

    def reopen_search(self, search_id: str) -> bool:
        """A search that ended (cancelled, failed) runs again: status running, cancel flag cleared."""
        s = searches_table.c
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(searches_table).where(s.id == search_id)
                               .values(status="running", cancel_requested=False, finished_at=None, error=None))
            return res.rowcount == 1

    def trial_runs(self, study: str) -> list[Run]:
        """The runs of one Optuna study (every trial), oldest first."""
        c = runs_table.c
        query = sa.select(*_LIST_COLUMNS).where(c.study == study).order_by(c.trial, c.seq)
        with self.engine.connect() as conn:
            return [_decode(row) for row in conn.execute(query)]

    # -- readers ---------------------------------------------------------------------------------
    def resolve_id(self, prefix: str) -> str:
        """The full id of the run whose id is `prefix` or starts with it (must be unique)."""
        if not isinstance(prefix, str) or not prefix.strip():
            raise ValueError("run_id: must be a non-empty run id (or a unique prefix of one)")
        prefix = prefix.strip()
        with self.engine.connect() as conn:
            ids = conn.execute(sa.select(runs_table.c.id)
                               .where(runs_table.c.id.startswith(prefix, autoescape=True))
                               .limit(2)).scalars().all()
        if not ids:
            raise ValueError(f"run_id: no run {prefix!r} in the store {self.url}")
        if len(ids) > 1 and prefix not in ids:
            raise ValueError(f"run_id: {prefix!r} matches several runs; give more of the id")
        return prefix if prefix in ids else ids[0]

    def get_run(self, run_id: str) -> Run:
        full = self.resolve_id(run_id)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs_table).where(runs_table.c.id == full)).one()
        return _decode(row)

    def _filters(self, status, kind, group, text) -> list[Any]:
        c = runs_table.c
        cond: list[Any] = []
        if (statuses := _as_list(status)) is not None:
            bad = [s for s in statuses if s not in STATUSES]
            if bad:
                raise ValueError(f"status: must be among {', '.join(STATUSES)} (got {bad})")
            cond.append(c.status.in_(statuses))
        if (kinds := _as_list(kind)) is not None:
            cond.append(c.kind.in_(kinds))
        if group is not None:
            cond.append(c.group_id == group)
        if text:
            pattern = f"%{text.lower()}%"
            cond.append(sa.or_(sa.func.lower(c.name).like(pattern), c.id.like(pattern),
                               sa.func.lower(c.params).like(pattern)))
        return cond

    def list_runs(self, status: str | Iterable[str] | None = None, kind: str | Iterable[str] | None = None,
                  group: str | None = None, text: str | None = None, limit: int = 100,
                  offset: int = 0) -> list[Run]:
        """Runs newest first, filtered; without the (possibly large) result column."""
        if not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise ValueError(f"limit: must be an integer in [1, 100000] (got {limit!r})")
        query = (sa.select(*_LIST_COLUMNS).where(*self._filters(status, kind, group, text))
                 .order_by(runs_table.c.seq.desc(), runs_table.c.id).limit(limit).offset(offset))
        with self.engine.connect() as conn:
            return [_decode(row) for row in conn.execute(query)]

    def count_by_status(self, kind: str | Iterable[str] | None = None, group: str | None = None,
                        text: str | None = None) -> dict[str, int]:
        c = runs_table.c
        query = (sa.select(c.status, sa.func.count()).where(*self._filters(None, kind, group, text))
                 .group_by(c.status))
        counts = dict.fromkeys(STATUSES, 0)
        with self.engine.connect() as conn:
            counts.update({status: n for status, n in conn.execute(query)})
        return counts

    def runs_with_status(self, statuses: Iterable[str], host: str | None = None,
                         limit: int = 10_000) -> list[Run]:
        """Runs in the given statuses, oldest first (the scheduler's queue order)."""
        c = runs_table.c
        cond = [c.status.in_(list(statuses))]
        if host is not None:
            cond.append(c.host == host)
        query = sa.select(*_LIST_COLUMNS).where(*cond).order_by(c.seq, c.id).limit(limit)
        with self.engine.connect() as conn:
            return [_decode(row) for row in conn.execute(query)]

    def find_cached(self, cache_key: str) -> Run | None:
        c = runs_table.c
        query = (sa.select(runs_table).where(c.cache_key == cache_key,
                                             c.status.in_(("queued", "running", "completed")))
                 .order_by(c.seq.desc()).limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return _decode(row) if row is not None else None

    def server_now(self) -> datetime:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(utcnow())).scalar_one()

    def stale_runs(self, stale_after_s: float) -> list[Run]:
        """Running runs whose last heartbeat is older than `stale_after_s` by the server's clock."""
        now = self.server_now()
        return [r for r in self.runs_with_status(["running"])
                if r["heartbeat_at"] is None or (now - r["heartbeat_at"]).total_seconds() > stale_after_s]

    def metric_times(self, run_ids: Iterable[str]) -> pd.DataFrame:
        """Wall-clock seconds of every logged (run, kind, step) since the run's first record.

        Each metric row carries its writer's unix time; this reads the earliest per (run, kind, step),
        so x = time plots show the real elapsed time including evaluation and checkpoints."""
        import pandas as pd

        m = metrics_table.c
        query = (sa.select(m.run_id, m.kind, m.step, sa.func.min(m.time))
                 .where(m.run_id.in_(list(run_ids)), m.time.is_not(None))
                 .group_by(m.run_id, m.kind, m.step))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        frame = pd.DataFrame(rows, columns=["run_id", "kind", "step", "time"])
        if not frame.empty:
            frame["time"] = frame["time"] - frame.groupby("run_id")["time"].transform("min")
        return frame

    def groups(self, kind: str | None = None) -> list[tuple[str, str]]:
        """(group_id, name of its first run) of every group of runs (of `kind`), newest group first."""
        c = runs_table.c
        cond = [c.group_id.is_not(None)] + ([c.kind == kind] if kind is not None else [])
        first = (sa.select(c.group_id, sa.func.min(c.seq).label("seq")).where(*cond)
                 .group_by(c.group_id).subquery())
        query = (sa.select(c.group_id, c.name).join(first, sa.and_(c.group_id == first.c.group_id,
                                                                     c.seq == first.c.seq))
                 .order_by(first.c.seq.desc()))
        with self.engine.connect() as conn:
            return [(row.group_id, row.name) for row in conn.execute(query)]

    def metric_names(self, run_ids: Iterable[str]) -> list[tuple[str, str]]:
        c = curves_table.c  # one row per curve: the metrics themselves are not scanned
        query = (sa.select(c.kind, c.name).where(c.run_id.in_(list(run_ids)), c.rows > 0).distinct()
                 .order_by(c.kind, c.name))
        with self.engine.connect() as conn:
            return [(k, n) for k, n in conn.execute(query)]

    def metrics(self, run_ids: Iterable[str], names: Iterable[str] | None = None, kind: str | None = None,
                max_points: int | None = None):
        """Long-format metrics (pandas DataFrame: run_id, kind, name, step, value), sorted by step.

        With `max_points`, a curve (run, kind, name) with more values than that comes from its
        write-time buckets (`samlab.runs.curves`): the finest bucket width whose buckets give at most
        `max_points` points, each bucket as its first, smallest, largest and last point (NaN values,
        stored as NULL, are not in buckets: a curve without any finite value is left out). A live view's
        incremental read is `new_metrics`."""
        import numpy as np
        import pandas as pd

        if max_points is not None and (not isinstance(max_points, int) or max_points < 1):
            raise ValueError(f"max_points: must be a positive integer or None (got {max_points!r})")
        ids = list(run_ids)
        names = _as_list(names)
        with self.engine.connect() as conn:
            if max_points is None:
                rows = conn.execute(_raw_query(_metric_filters(metrics_table, ids, names, kind))).all()
            else:
                rows = _downsampled_rows(conn, ids, names, kind, max_points)
        # column by column from plain tuples (pandas probing each SQLAlchemy Row costs more than the
        # query); downsampled rows come sorted already
        if not rows:
            return pd.DataFrame({"run_id": pd.Series(dtype=object), "kind": pd.Series(dtype=object),
                                 "name": pd.Series(dtype=object), "step": np.array((), dtype="int64"),
                                 "value": np.array((), dtype=float)})
        run_col, kind_col, name_col, steps, values = zip(*rows)
        return pd.DataFrame({"run_id": list(run_col), "kind": list(kind_col), "name": list(name_col),
                             "step": np.array(steps, dtype="int64"), "value": np.array(values, dtype=float)})

    def new_metrics(self, run_id: str, cursor: tuple[int, float | None] | None = None
                    ) -> tuple[list[tuple[str, str, int, float]], tuple[int, float | None] | None, bool]:
        """The metric rows (kind, name, step, value; NaN for NULL) of one run written since the read that
        returned `cursor`, in the order they were written; the cursor for the next read; and whether the
        rows replace everything read before.

        A cursor is the id and write time of the last row read. Ids grow with every insert and a run has
        one writer (its worker), so the rows after it are the new ones, and the read walks only the ids
        above it (rows written since, by any run), never the run's older rows: a refresh of a long run
        with nothing new costs a lookup, not a scan. A resumed run rewrites its tail: the new rows either
        come after the cursor (steps the reader had, which replace the old ones), or, when the rewrite
        removed the cursor's row (SQLite then hands its id out again), every row of the run comes back
        with the flag set."""
        m = metrics_table.c
        columns = (m.id, m.time, m.kind, m.name, m.step, m.value)
        rows: list[Any] = []
        if cursor is not None:
            run = m.run_id
            if self.engine.dialect.name == "sqlite":
                # `run_id || ''` is no index key: SQLite then walks the ids from the cursor on instead of
                # the run's whole range of the (run_id, …) index (PostgreSQL's planner picks that itself)
                run = m.run_id.concat("")
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(*columns).where(m.id >= int(cursor[0]), run == run_id)
                                    .order_by(m.id)).all()
        replaced = cursor is not None and not (rows and (rows[0][0], rows[0][1]) == tuple(cursor))
        if cursor is None or replaced:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(*columns).where(m.run_id == run_id).order_by(m.id)).all()
        else:
            rows = rows[1:]  # the cursor's own row, read before
        new_cursor = (int(rows[-1][0]), rows[-1][1]) if rows else (cursor if not replaced else None)
        return [(k, n, int(step), float("nan") if v is None else float(v)) for _, _, k, n, step, v in rows], \
            new_cursor, replaced

    def latest_metrics(self, run_ids: Iterable[str], names: Iterable[str] | None = None,
                       kind: str = "epoch") -> dict[str, dict[str, float | None]]:
        """The last recorded value of each metric of each run (largest step)."""
        m = metrics_table.c
        cond = [m.run_id.in_(list(run_ids)), m.kind == kind]
        if names is not None:
            cond.append(m.name.in_(list(names)))
        last = (sa.select(m.run_id, m.name, sa.func.max(m.step).label("step")).where(*cond)
                .group_by(m.run_id, m.name).subquery())
        query = sa.select(m.run_id, m.name, m.value).join(
            last, sa.and_(m.run_id == last.c.run_id, m.name == last.c.name, m.step == last.c.step)
        ).where(m.kind == kind)
        out: dict[str, dict[str, float | None]] = {}
        with self.engine.connect() as conn:
            for run_id, name, value in conn.execute(query):
                out.setdefault(run_id, {})[name] = value
        return out

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        a = artifacts_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(artifacts_table).where(a.run_id == run_id).order_by(a.name))
            return [dict(r._mapping) for r in rows]


def _metric_filters(table: sa.Table, run_ids: list[str], names: list[str] | None, kind: str | None) -> list[Any]:
    c = table.c
    cond: list[Any] = [c.run_id.in_(run_ids)]
    if names is not None:
        cond.append(c.name.in_(names))
    if kind is not None:
        cond.append(c.kind == kind)
    return cond


def _raw_query(cond: list[Any]):
    m = metrics_table.c
    return sa.select(m.run_id, m.kind, m.name, m.step, m.value).where(*cond).order_by(
        m.run_id, m.kind, m.name, m.step)


def _chunks(items: list[Any], size: int = 200) -> Iterable[list[Any]]:
    """Bounded IN lists (SQLite limits the number of bound parameters of one statement)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _downsampled_rows(conn: sa.Connection, run_ids: list[str], names: list[str] | None, kind: str | None,
                      max_points: int) -> list[tuple[Any, ...]]:
    """Short curves point for point, long ones from the level of buckets that fits `max_points`; the
    level comes from each curve's metric_curves row. Rows sorted by run, kind, name and step."""
    c, b = curves_table.c, buckets_table.c
    query = sa.select(c.run_id, c.kind, c.name, c.n, *[c[col] for col in _LEVEL_COLUMNS]).where(
        c.n > 0, *_metric_filters(curves_table, run_ids, names, kind))
    by_level: dict[int | None, set[tuple[str, str, str]]] = {}
    for run_id, kind_, name, n_points, *n_buckets in conn.execute(query):
        level = curves.choose_level(n_points, dict(enumerate(n_buckets)), max_points)
        by_level.setdefault(level, set()).add((run_id, kind_, name))
    # plain run_id IN / name IN / kind filters (the indexes serve them; row-value IN lists they do
    # not), then only the curves chosen for each source are kept
    points: dict[tuple[str, str, str], list[tuple[int, float | None]]] = {}
    for level, wanted in by_level.items():
        ids = sorted({run_id for run_id, _, _ in wanted})
        if level is None:
            for run_id, kind_, name, step, value in conn.execute(
                    _raw_query(_metric_filters(metrics_table, ids, names, kind))).all():
                if (run_id, kind_, name) in wanted:
                    points.setdefault((run_id, kind_, name), []).append((step, value))
            continue
        found = conn.execute(sa.select(b.run_id, b.kind, b.name, *_EDGE_COLUMNS)
                             .where(b.level == level, *_metric_filters(buckets_table, ids, names, kind))
                             .order_by(b.run_id, b.kind, b.name, b.bucket)).all()
        for run_id, kind_, name, *edges in found:
            if (run_id, kind_, name) in wanted:
                points.setdefault((run_id, kind_, name), []).extend(curves.edge_points(*edges))
    return [(*curve, step, value) for curve in sorted(points) for step, value in points[curve]]


def _add_to_buckets(conn: sa.Connection, run_id: str, rows: Sequence[tuple[str, int, str, float | None, float]],
                    known: dict[tuple[str, str, str], curves.OpenCurve]
                    ) -> dict[tuple[str, str, str], curves.OpenCurve]:
    """Fold a flush's metric rows into the run's buckets and curve rows. A bucket that may exist is
    read back unless `known` (the writer's memory, valid while the curve's version matches) has it:
    a flush that only extends its curves reads one metric_curves row per curve and no bucket. Returns
    what the writer knows after this write."""
    points: dict[tuple[str, str], list[tuple[int, float | None]]] = {}
    for kind, step, name, value, _ in rows:
        points.setdefault((kind, name), []).append((step, value))
    c = curves_table.c
    stored = {(r.kind, r.name): r for r in conn.execute(sa.select(curves_table).where(
        c.run_id == run_id, c.name.in_(sorted({name for _, name in points}))))}
    opened: dict[tuple[str, str, str], curves.OpenCurve] = {}
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for (kind, name), curve in points.items():
        row = stored.get((kind, name))
        state = known.get((run_id, kind, name))
        if row is None or row.n == 0:
            last: list[tuple[int, curves.Bucket] | None] | None = [None] * len(curves.LEVEL_WIDTHS)
        elif state is not None and state.version == row.version:
            last = list(state.last)
        else:
            last = None  # not known: read what this flush touches
        folded = [curves.fold(curve, width) for width in curves.LEVEL_WIDTHS]
        unread = {level: min(new) for level, new in enumerate(folded)
                  if new and (last is None or (last[level] is not None and min(new) < last[level][0]))}
        existing = _read_buckets(conn, run_id, kind, name, unread)
        added = [0] * len(folded)
        tops: list[tuple[int, curves.Bucket] | None] = []
        for level, new in enumerate(folded):
            top = last[level] if last is not None else None
            candidates = dict([top] if top is not None else []) | existing.get(level, {})
            for index, bucket in new.items():
                old = candidates.get(index) if level in unread or top is None or index == top[0] else None
                merged = old.merge(bucket) if old is not None else bucket
                key = {"run_id": run_id, "kind": kind, "name": name, "level": level, "bucket": index}
                if old is None:
                    inserts.append(key | merged.as_row())
                    added[level] += 1
                else:
                    updates.append({f"key_{k}": v for k, v in key.items()} | merged.as_row())
                candidates[index] = merged
            tops.append(max(candidates.items()) if candidates else None)
        version = (row.version + 1) if row is not None else 1
        n_points = sum(bucket.n for bucket in folded[0].values())
        counts = {col: (getattr(row, col) if row is not None else 0) + added[level]
                  for level, col in enumerate(_LEVEL_COLUMNS)}
        curve_row = {"rows": (row.rows if row is not None else 0) + len(curve),
                     "n": (row.n if row is not None else 0) + n_points, "version": version, **counts}
        _write_curve_row(conn, (run_id, kind, name), curve_row, exists=row is not None)
        if last is not None or all(folded):  # every level's last bucket known
            opened[(run_id, kind, name)] = curves.OpenCurve(version, tops)
    b = buckets_table.c
    if updates:
        conn.execute(sa.update(buckets_table).where(
            b.run_id == sa.bindparam("key_run_id"), b.kind == sa.bindparam("key_kind"),
            b.name == sa.bindparam("key_name"), b.level == sa.bindparam("key_level"),
            b.bucket == sa.bindparam("key_bucket")), updates)
    if inserts:
        conn.execute(sa.insert(buckets_table), inserts)
    return opened


def _read_buckets(conn: sa.Connection, run_id: str, kind: str, name: str, start: dict[int, int]
                  ) -> dict[int, dict[int, curves.Bucket]]:
    """A curve's stored buckets from index `start[level]` on at those levels ({level: {index: bucket}})."""
    if not start:
        return {}
    b = buckets_table.c
    found = conn.execute(sa.select(buckets_table).where(
        b.run_id == run_id, b.kind == kind, b.name == name,
        sa.or_(*[sa.and_(b.level == level, b.bucket >= index) for level, index in start.items()])))
    out: dict[int, dict[int, curves.Bucket]] = {}
    for row in found:
        out.setdefault(row.level, {})[row.bucket] = curves.Bucket.from_row(row._mapping)
    return out


def _write_curve_row(conn: sa.Connection, curve: tuple[str, str, str], values: dict[str, Any], *,
                     exists: bool) -> None:
    run_id, kind, name = curve
    c = curves_table.c
    if exists:
        conn.execute(sa.update(curves_table).where(c.run_id == run_id, c.kind == kind, c.name == name)
                     .values(**values))
    else:
        conn.execute(sa.insert(curves_table).values(run_id=run_id, kind=kind, name=name, **values))


def _rebuild_buckets(conn: sa.Connection, run_id: str, kind: str, name: str, step: int) -> None:
    """A curve cut at `step` (its later rows deleted): rebuild every bucket that held `step` or later
    from the raw rows left, and recount its metric_curves row (a new version: writers' memory of the
    curve is void)."""
    b, m, c = buckets_table.c, metrics_table.c, curves_table.c
    for level, width in enumerate(curves.LEVEL_WIDTHS):
        conn.execute(sa.delete(buckets_table).where(b.run_id == run_id, b.kind == kind, b.name == name,
                                                    b.level == level, b.bucket >= step // width))
    widest = curves.LEVEL_WIDTHS[-1]
    kept = conn.execute(sa.select(m.step, m.value).where(
        m.run_id == run_id, m.kind == kind, m.name == name, m.step >= step // widest * widest,
        m.step < step)).all()
    _insert_buckets(conn, (run_id, kind, name), [tuple(r) for r in kept], from_step=step)
    version = conn.execute(sa.select(c.version).where(c.run_id == run_id, c.kind == kind, c.name == name)
                           ).scalar_one_or_none()
    counted = _count_curves(conn, [m.run_id == run_id, m.kind == kind, m.name == name],
                            [b.run_id == run_id, b.kind == kind, b.name == name])
    values = counted.get((run_id, kind, name)) or {"rows": 0, "n": 0, **dict.fromkeys(_LEVEL_COLUMNS, 0)}
    values = {k: v for k, v in values.items() if k not in ("run_id", "kind", "name")}
    values["version"] = (version or 0) + 1
    _write_curve_row(conn, (run_id, kind, name), values, exists=version is not None)


def _default_runs_root(url: str) -> Path:
    """Run folders live beside a SQLite file; for server databases in SAMLAB_RUNS_DIR or data/runs."""
    if env := os.environ.get("SAMLAB_RUNS_DIR"):
        return Path(env)
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return Path(parsed.database).resolve().parent
    return DEFAULT_DB.parent


_STORES: dict[tuple[int, str], Store] = {}


def open_store(url: Store | str | None = None) -> Store:
    """The Store for `url` (default: `default_url()`), one per URL per process; a Store is returned as is."""
    if isinstance(url, Store):
        return url
    key = (os.getpid(), url or default_url())
    if key not in _STORES:
        _STORES[key] = Store(key[1])
    return _STORES[key]
