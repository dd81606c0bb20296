"""A fresh PostgreSQL schema per test on the server that SAMLAB_TEST_PG names (a SQLAlchemy URL).

Without SAMLAB_TEST_PG the PostgreSQL variants of the store tests are skipped; `.ci/run` starts a
throwaway cluster on loopback and sets it, and sets SAMLAB_REQUIRE_ALL=1, under which such a skip is a
failure (tests/conftest.py), so CI always runs them. Each test gets its own schema
(selected through the connection's search_path) and the schema is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from samlab.runs.store import Store

PG_URL = os.environ.get("SAMLAB_TEST_PG") or None
SKIP_REASON = "SAMLAB_TEST_PG is not set (a postgresql+psycopg:// URL of a test server; .ci/run starts one)"
BACKENDS = ["sqlite", "postgresql"]


def require_pg() -> str:
    if PG_URL is None:
        pytest.skip(SKIP_REASON)
    return PG_URL


@contextlib.contextmanager
def fresh_schema_url(label: str = "t") -> Iterator[str]:
    """A URL of the test server whose connections see only a new, empty schema; dropped at exit."""
    base = sa.make_url(require_pg())
    schema = f"samlab_{label}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = base.update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextlib.contextmanager
def store_on(backend: str, tmp_path: Path) -> Iterator[Store]:
    """A Store on a fresh SQLite file or a fresh PostgreSQL schema, run folders under tmp_path."""
    if backend == "sqlite":
        yield Store(f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}")
        return
    with fresh_schema_url() as url:
        store = Store(url, runs_root=tmp_path / "runs")
        try:
            yield store
        finally:
            store.dispose()
