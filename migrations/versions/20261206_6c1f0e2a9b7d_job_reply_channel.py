"""job reply channel

A job row names the channel of the web process that accepted it with ``Prefer:
wait`` (``reply_to``), so its outcome is published to that process alone instead of
to every web process (the finish notification was a broadcast each of them parsed).

Additive and nullable: the previous release neither writes nor reads it, and its
drains (which select named columns) are unaffected.

Revision ID: 6c1f0e2a9b7d
Revises: 41d86260e91d
Create Date: 2026-12-06 13:00:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "6c1f0e2a9b7d"
down_revision: Union[str, Sequence[str], None] = "41d86260e91d"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("jobs", sa.Column("reply_to", sa.String(length=100), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("jobs", "reply_to")
