"""Initial plan store: placements, plans, load snapshots, rollouts, rollout acknowledgements.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "placements",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("plan_version", sa.BigInteger, nullable=False),
        sa.Column("last_rebalance", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_table(
        "plans",
        sa.Column("placement", sa.String(63),
                  sa.ForeignKey("placements.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("previous_version", sa.BigInteger, nullable=False),
        sa.Column("num_nodes", sa.Integer, nullable=False),
        sa.Column("gpus_per_node", sa.Integer, nullable=False),
        sa.Column("phy2log", sa.LargeBinary, nullable=False),
        sa.Column("log2phy", sa.LargeBinary, nullable=False),
        sa.Column("logcnt", sa.LargeBinary, nullable=False),
        sa.Column("load_snapshot", sa.LargeBinary, nullable=False),
        sa.Column("predicted_balance", sa.JSON, nullable=False),
        sa.Column("current_balance", sa.JSON, nullable=False),
        sa.Column("slots_moved", sa.BigInteger, nullable=False),
        sa.Column("bytes_moved", sa.BigInteger, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "load_snapshots",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("placement", sa.String(63),
                  sa.ForeignKey("placements.name", ondelete="CASCADE"), nullable=False),
        sa.Column("taken_at", _TS, nullable=False),
        sa.Column("reports", sa.BigInteger, nullable=False),
        sa.Column("load", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_load_snapshots_placement", "load_snapshots", ["placement"])
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("placement", sa.String(63),
                  sa.ForeignKey("placements.name", ondelete="CASCADE"), nullable=False),
        sa.Column("from_version", sa.BigInteger, nullable=False),
        sa.Column("to_version", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("sync", sa.Boolean, nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("prepare_seconds", sa.Double, nullable=False),
        sa.Column("commit_seconds", sa.Double, nullable=False),
    )
    op.create_index("ix_rollouts_placement", "rollouts", ["placement"])
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_acks",
        sa.Column("rollout_id", sa.String(64),
                  sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("node", sa.String(253), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("at", _TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rollout_acks")
    op.drop_index("ix_rollouts_state", "rollouts")
    op.drop_index("ix_rollouts_placement", "rollouts")
    op.drop_table("rollouts")
    op.drop_index("ix_load_snapshots_placement", "load_snapshots")
    op.drop_table("load_snapshots")
    op.drop_table("plans")
    op.drop_table("placements")
