"""SQLAlchemy 2 table models of the plan store (the schema Alembic migrations create).

Arrays are stored as ``.npy`` bytes (``LargeBinary``); times are UTC.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Double, ForeignKey, Integer,
                        LargeBinary, String, Text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class PlacementRow(Base):
    """A registered placement: its spec (the wire ``Placement`` as JSON) and the plan in force."""

    __tablename__ = "placements"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    spec_json: Mapped[str] = mapped_column(Text)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    plan_version: Mapped[int] = mapped_column(BigInteger, default=0)
    last_rebalance: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class PlanRow(Base):
    """An immutable plan version; (placement, version) is unique, versions start at 1."""

    __tablename__ = "plans"
    placement: Mapped[str] = mapped_column(
        String(63), ForeignKey("placements.name", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(32))
    previous_version: Mapped[int] = mapped_column(BigInteger, default=0)
    num_nodes: Mapped[int] = mapped_column(Integer)
    gpus_per_node: Mapped[int] = mapped_column(Integer)
    phy2log: Mapped[bytes] = mapped_column(LargeBinary)
    log2phy: Mapped[bytes] = mapped_column(LargeBinary)
    logcnt: Mapped[bytes] = mapped_column(LargeBinary)
    load_snapshot: Mapped[bytes] = mapped_column(LargeBinary)
    predicted_balance: Mapped[list] = mapped_column(JSON)
    current_balance: Mapped[list] = mapped_column(JSON)
    slots_moved: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_moved: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class LoadSnapshotRow(Base):
    """A periodic copy of a placement's load window ``[L, E]``."""

    __tablename__ = "load_snapshots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    placement: Mapped[str] = mapped_column(
        String(63), ForeignKey("placements.name", ondelete="CASCADE"), index=True)
    taken_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    reports: Mapped[int] = mapped_column(BigInteger)
    load: Mapped[bytes] = mapped_column(LargeBinary)


class RolloutRow(Base):
    """A two-phase rollout; ``state`` is preparing | committing | committed | aborted."""

    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    placement: Mapped[str] = mapped_column(
        String(63), ForeignKey("placements.name", ondelete="CASCADE"), index=True)
    from_version: Mapped[int] = mapped_column(BigInteger)
    to_version: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    sync: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    prepare_seconds: Mapped[float] = mapped_column(Double, default=0.0)
    commit_seconds: Mapped[float] = mapped_column(Double, default=0.0)


class RolloutAckRow(Base):
    """One worker's answer in one phase of a rollout (prepared | committed | aborted | failed)."""

    __tablename__ = "rollout_acks"
    rollout_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    node: Mapped[str] = mapped_column(String(253))
    message: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
