"""jobs record their user

``jobs.user_id``: the user a job acts for (the ``userId`` of its request; with
``AUTH_MODE=jwt`` the token's user), so that a job's status is readable by that
user and admins only (API.md, Access).  Nullable: admin jobs (``STOCK_SET``) have no
user, and rows written before this revision have none (admins still read them).

Adding a nullable column without a default is a catalogue change only (no table
rewrite, a brief ACCESS EXCLUSIVE lock).  The previous release keeps working: it
names the columns it inserts, so its rows get NULL.

Revision ID: 5c3e9a7d2b14
Revises: 6c1f0e2a9b7d
Create Date: 2026-12-06 12:55:00.000000

"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "5c3e9a7d2b14"
down_revision: Union[str, None] = "6c1f0e2a9b7d"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("user_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "user_id")
