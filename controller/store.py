"""The plan store: placements, immutable plan versions, load snapshots and rollouts in SQL.

SQLAlchemy 2 over SQLite (default) or PostgreSQL (``postgresql+psycopg://...``); the schema is
created and upgraded by the Alembic migrations in ``controller/migrations`` when a ``Store``
opens. Every method is one transaction; methods are thread-safe.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import pathlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from alembic import command
from alembic.config import Config
from google.protobuf import json_format
from sqlalchemy import create_engine, delete, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from expertplane.controller.spec import PlacementSpec, spec_from_proto, spec_to_proto
from expertplane.controller.tables import (LoadSnapshotRow, PlacementRow, PlanRow, RolloutAckRow,
                                           RolloutRow)
from expertplane.errors import FailedPrecondition, NotFound
from expertplane.proto import expertplane_pb2 as pb

MIGRATIONS = pathlib.Path(__file__).with_name("migrations")
ACTIVE_STATES = ("preparing", "committing")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes: they were stored as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def pack_array(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def unpack_array(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


@dataclass(frozen=True)
class PlanRecord:
    """A stored plan. phy2log [L, R], log2phy [L, E, X] (-1 padded), logcnt [L, E] int64;
    load_snapshot [L, E] float64 tokens; balances per layer (max GPU load / mean GPU load)."""

    placement: str
    version: int
    algorithm: str
    reason: str
    previous_version: int
    num_nodes: int
    gpus_per_node: int
    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    load_snapshot: np.ndarray
    predicted_balance: list[float]
    current_balance: list[float]
    slots_moved: int
    bytes_moved: int
    created_at: dt.datetime


@dataclass(frozen=True)
class StoredPlacement:
    spec: PlacementSpec
    plan_version: int
    last_rebalance: dt.datetime | None


@dataclass
class RolloutRecord:
    """A rollout and the ranks that acknowledged each phase (``acks[kind] = {rank: node}``)."""

    id: str
    placement: str
    from_version: int
    to_version: int
    state: str
    reason: str = ""
    sync: bool = False
    started_at: dt.datetime = field(default_factory=utcnow)
    finished_at: dt.datetime | None = None
    prepare_seconds: float = 0.0
    commit_seconds: float = 0.0
    acks: dict[str, dict[int, str]] = field(default_factory=dict)


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (``alembic upgrade head``)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class Store:
    """Plan store at ``url``; ``observe(op, seconds)`` is called after every operation."""

    def __init__(self, url: str, *, observe: Callable[[str, float], None] | None = None):
        self.url = url
        migrate(url)
        sqlite = url.startswith("sqlite")
        self._engine = create_engine(
            url, pool_pre_ping=not sqlite,
            connect_args={"check_same_thread": False, "timeout": 10} if sqlite else {})
        if sqlite:
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self._engine, expire_on_commit=False)
        self._observe = observe or (lambda op, seconds: None)

    def close(self) -> None:
        self._engine.dispose()

    def _tx(self, op: str):
        return _Timed(self, op)

    # ------------------------------------------------------------------ placements

    def upsert_placement(self, spec: PlacementSpec) -> StoredPlacement:
        """Insert or update a placement by name. A new shape (layers, experts, slots, GPUs)
        leaves it with no plan in force (``plan_version`` 0; its plans stay in its history): the
        caller then stores a plan of the new shape, with the next version."""
        spec_json = json_format.MessageToJson(spec_to_proto(spec), indent=None)
        now = utcnow()
        with self._tx("upsert_placement") as s:
            row = s.get(PlacementRow, spec.name, with_for_update=True)
            if row is None:
                row = PlacementRow(name=spec.name, spec_json=spec_json, generation=spec.generation,
                                   plan_version=0, created_at=now, updated_at=now)
                s.add(row)
            else:
                if not _spec(row).same_shape(spec):
                    row.plan_version = 0
                row.spec_json, row.generation, row.updated_at = spec_json, spec.generation, now
            return StoredPlacement(spec, row.plan_version, _utc(row.last_rebalance))

    def get_placement(self, name: str) -> StoredPlacement:
        with self._tx("get_placement") as s:
            row = s.get(PlacementRow, name)
            if row is None:
                raise NotFound("placement", f"unknown placement {name!r}")
            return StoredPlacement(_spec(row), row.plan_version, _utc(row.last_rebalance))

    def list_placements(self) -> list[StoredPlacement]:
        with self._tx("list_placements") as s:
            rows = s.scalars(select(PlacementRow).order_by(PlacementRow.name)).all()
            return [StoredPlacement(_spec(r), r.plan_version, _utc(r.last_rebalance)) for r in rows]

    def delete_placement(self, name: str) -> bool:
        """Delete a placement with its plans, snapshots and rollouts; False if it did not exist."""
        with self._tx("delete_placement") as s:
            row = s.get(PlacementRow, name)
            if row is None:
                return False
            ids = select(RolloutRow.id).where(RolloutRow.placement == name)
            s.execute(delete(RolloutAckRow).where(RolloutAckRow.rollout_id.in_(ids)))
            for table in (RolloutRow, LoadSnapshotRow, PlanRow):
                s.execute(delete(table).where(table.placement == name))
            s.delete(row)
            return True

    # ------------------------------------------------------------------ plans

    def add_plan(self, plan: PlanRecord, *, in_force: bool = False) -> PlanRecord:
        """Store ``plan`` as the next version, or as ``plan.version`` when that is higher (a plan
        restored under the version it had; versions only grow); returns it with the assigned
        version. ``in_force`` also makes it the placement's plan in force (used for first plans;
        rollouts go through ``decide_commit``)."""
        for attempt in range(5):
            try:
                with self._tx("add_plan") as s:
                    owner = s.get(PlacementRow, plan.placement, with_for_update=True)
                    if owner is None:
                        raise NotFound("placement", f"unknown placement {plan.placement!r}")
                    latest = s.scalar(select(func.max(PlanRow.version))
                                      .where(PlanRow.placement == plan.placement)) or 0
                    stored = replace(plan, version=max(latest + 1, plan.version))
                    s.add(_plan_row(stored))
                    if in_force:  # a first plan: not a rebalance, so no last_rebalance
                        owner.plan_version = stored.version
                    return stored
            except IntegrityError:  # a concurrent writer took the version: take the next one
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def get_plan(self, placement: str, version: int = 0) -> PlanRecord:
        """Plan ``version`` of ``placement`` (0 = latest)."""
        with self._tx("get_plan") as s:
            if s.get(PlacementRow, placement) is None:
                raise NotFound("placement", f"unknown placement {placement!r}")
            q = select(PlanRow).where(PlanRow.placement == placement)
            q = q.where(PlanRow.version == version) if version else q.order_by(PlanRow.version.desc()).limit(1)
            row = s.scalars(q).first()
            if row is None:
                raise NotFound("version", f"placement {placement!r} has no plan version {version}"
                               if version else f"placement {placement!r} has no plan yet")
            return _plan_record(row)

    def latest_version(self, placement: str) -> int:
        with self._tx("latest_version") as s:
            return s.scalar(select(func.max(PlanRow.version)).where(PlanRow.placement == placement)) or 0

    def list_plans(self, placement: str, *, after_version: int = 0, limit: int = 100) -> list[PlanRecord]:
        """Plans with version > ``after_version`` in ascending order; empty placement = all."""
        with self._tx("list_plans") as s:
            q = select(PlanRow).where(PlanRow.version > after_version)
            if placement:
                q = q.where(PlanRow.placement == placement)
            q = q.order_by(PlanRow.placement, PlanRow.version).limit(limit)
            return [_plan_record(r) for r in s.scalars(q)]

    # ------------------------------------------------------------------ load snapshots

    def add_load_snapshot(self, placement: str, load: np.ndarray, reports: int,
                          *, keep: int = 100) -> None:
        """Record the window ``load`` [L, E]; keeps the newest ``keep`` snapshots per placement."""
        with self._tx("add_load_snapshot") as s:
            s.add(LoadSnapshotRow(placement=placement, taken_at=utcnow(), reports=reports,
                                  load=pack_array(np.asarray(load, dtype=np.float64))))
            s.flush()
            old = select(LoadSnapshotRow.id).where(LoadSnapshotRow.placement == placement) \
                .order_by(LoadSnapshotRow.id.desc()).offset(keep)
            s.execute(delete(LoadSnapshotRow).where(LoadSnapshotRow.id.in_(old)))

    def latest_load_snapshot(self, placement: str) -> tuple[np.ndarray, int, dt.datetime] | None:
        """(load [L, E], reports, taken_at) of the newest snapshot, or None."""
        with self._tx("latest_load_snapshot") as s:
            row = s.scalars(select(LoadSnapshotRow).where(LoadSnapshotRow.placement == placement)
                            .order_by(LoadSnapshotRow.id.desc()).limit(1)).first()
            return None if row is None else (unpack_array(row.load), row.reports, _utc(row.taken_at))

    # ------------------------------------------------------------------ rollouts

    def create_rollout(self, rec: RolloutRecord) -> None:
        with self._tx("create_rollout") as s:
            s.add(RolloutRow(id=rec.id, placement=rec.placement, from_version=rec.from_version,
                             to_version=rec.to_version, state=rec.state, reason=rec.reason,
                             sync=rec.sync, started_at=rec.started_at, finished_at=None,
                             prepare_seconds=0.0, commit_seconds=0.0))

    def decide_commit(self, rec: RolloutRecord) -> None:
        """Durably record the decision to commit: state ``committing``, the prepared acks, and the
        rollout's version as the placement's plan in force — all in one transaction."""
        with self._tx("decide_commit") as s:
            row = s.get(RolloutRow, rec.id, with_for_update=True)
            if row is None or row.state != "preparing":
                raise FailedPrecondition("rollout_id", f"rollout {rec.id} is not preparing")
            row.state, row.prepare_seconds = "committing", rec.prepare_seconds
            self._add_acks(s, rec, "prepared")
            if not rec.sync:
                s.execute(update(PlacementRow).where(PlacementRow.name == rec.placement)
                          .values(plan_version=rec.to_version, last_rebalance=utcnow()))

    def finish_rollout(self, rec: RolloutRecord, state: str) -> None:
        """Record the end of a rollout (``committed`` or ``aborted``) with the acks gathered."""
        with self._tx("finish_rollout") as s:
            row = s.get(RolloutRow, rec.id, with_for_update=True)
            if row is None:
                raise NotFound("rollout_id", f"unknown rollout {rec.id}")
            row.state, row.reason, row.finished_at = state, rec.reason, rec.finished_at or utcnow()
            row.prepare_seconds, row.commit_seconds = rec.prepare_seconds, rec.commit_seconds
            for kind in ("prepared", "committed", "aborted", "failed"):
                self._add_acks(s, rec, kind)

    @staticmethod
    def _add_acks(s: Session, rec: RolloutRecord, kind: str) -> None:
        """Insert the acks of ``kind`` not stored yet (one bulk INSERT)."""
        acks = rec.acks.get(kind, {})
        if not acks:
            return
        have = set(s.scalars(select(RolloutAckRow.rank).where(
            RolloutAckRow.rollout_id == rec.id, RolloutAckRow.kind == kind)))
        now = utcnow()
        rows = [{"rollout_id": rec.id, "rank": rank, "kind": kind, "node": node, "message": "",
                 "at": now} for rank, node in acks.items() if rank not in have]
        if rows:
            s.execute(insert(RolloutAckRow), rows)

    def active_rollouts(self) -> list[RolloutRecord]:
        """Rollouts that were preparing or committing (to resume after a restart)."""
        return self._rollouts(select(RolloutRow).where(RolloutRow.state.in_(ACTIVE_STATES))
                              .order_by(RolloutRow.started_at), "active_rollouts")

    def list_rollouts(self, placement: str, limit: int = 50) -> list[RolloutRecord]:
        """Most recent first; empty ``placement`` = all placements."""
        q = select(RolloutRow)
        if placement:
            q = q.where(RolloutRow.placement == placement)
        return self._rollouts(q.order_by(RolloutRow.started_at.desc()).limit(limit), "list_rollouts")

    def _rollouts(self, query, op: str) -> list[RolloutRecord]:
        with self._tx(op) as s:
            rows = s.scalars(query).all()
            out = []
            for r in rows:
                acks: dict[str, dict[int, str]] = {}
                for a in s.scalars(select(RolloutAckRow).where(RolloutAckRow.rollout_id == r.id)):
                    acks.setdefault(a.kind, {})[a.rank] = a.node
                out.append(RolloutRecord(
                    id=r.id, placement=r.placement, from_version=r.from_version,
                    to_version=r.to_version, state=r.state, reason=r.reason, sync=r.sync,
                    started_at=_utc(r.started_at), finished_at=_utc(r.finished_at),
                    prepare_seconds=r.prepare_seconds, commit_seconds=r.commit_seconds, acks=acks))
            return out


class _Timed:
    """A session in a transaction, timed for the store latency metric."""

    def __init__(self, store: Store, op: str):
        self._store, self._op = store, op

    def __enter__(self) -> Session:
        self._t0 = time.perf_counter()
        self._ctx = self._store._session.begin()
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        try:
            return self._ctx.__exit__(*exc)
        finally:
            self._store._observe(self._op, time.perf_counter() - self._t0)


def _spec(row: PlacementRow) -> PlacementSpec:
    return spec_from_proto(json_format.Parse(row.spec_json, pb.Placement()))


def _plan_row(p: PlanRecord) -> PlanRow:
    return PlanRow(placement=p.placement, version=p.version, algorithm=p.algorithm, reason=p.reason,
                   previous_version=p.previous_version, num_nodes=p.num_nodes,
                   gpus_per_node=p.gpus_per_node, phy2log=pack_array(p.phy2log.astype(np.int64)),
                   log2phy=pack_array(p.log2phy.astype(np.int64)),
                   logcnt=pack_array(p.logcnt.astype(np.int64)),
                   load_snapshot=pack_array(p.load_snapshot.astype(np.float64)),
                   predicted_balance=[float(x) for x in p.predicted_balance],
                   current_balance=[float(x) for x in p.current_balance],
                   slots_moved=int(p.slots_moved), bytes_moved=int(p.bytes_moved),
                   created_at=p.created_at)


def _plan_record(r: PlanRow) -> PlanRecord:
    return PlanRecord(placement=r.placement, version=r.version, algorithm=r.algorithm,
                      reason=r.reason, previous_version=r.previous_version, num_nodes=r.num_nodes,
                      gpus_per_node=r.gpus_per_node, phy2log=unpack_array(r.phy2log),
                      log2phy=unpack_array(r.log2phy), logcnt=unpack_array(r.logcnt),
                      load_snapshot=unpack_array(r.load_snapshot),
                      predicted_balance=list(r.predicted_balance),
                      current_balance=list(r.current_balance), slots_moved=r.slots_moved,
                      bytes_moved=r.bytes_moved, created_at=_utc(r.created_at))
