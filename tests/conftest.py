"""Shared fixtures: database URLs for the plan store (SQLite file, real PostgreSQL); every process
the tests start imports ``tests/site/sitecustomize.py`` (torchvision next to CPU torch) and uses
the planner's compiled kernels (``EXPERTPLANE_PLANNER_KERNELS=numba``)."""

from __future__ import annotations

import os
import runpy
import uuid
from pathlib import Path

import pytest

_SITE = str(Path(__file__).with_name("site"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_SITE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _SITE])
runpy.run_path(str(Path(_SITE) / "sitecustomize.py"))    # this process too (already started)
# The planner's compiled kernels in every test process, compiled there if the cache lacks them
# (as after an edit of the planner), never built in a background process behind the tests' back;
# tests of the numpy paths and of that build choose their mode themselves.
os.environ.setdefault("EXPERTPLANE_PLANNER_KERNELS", "numba")

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}"


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """SQLAlchemy URL of a fresh SQLite file under tmp_path."""
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def pg_url():
    """SQLAlchemy URL of a fresh PostgreSQL database (dropped afterwards) on the server at
    127.0.0.1:5432 (database ``test``, user postgres, trust auth). Skips when unreachable."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN}: {str(exc).strip()}")
    name = f"ep_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_URL.format(db=name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Each test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")
