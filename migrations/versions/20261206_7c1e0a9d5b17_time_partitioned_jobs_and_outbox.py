"""time partitioned jobs and outbox

``jobs`` becomes partitioned by range of its id (new job ids are UUIDv7: time
first) and ``outbox`` by range of ``created_at``, so that finished jobs and delivered
outbox rows go away a whole partition at a time once past their retention
(``shared.retention``, ARCHITECTURE rule 7).  Each gets a default partition for rows
no range covers.

The new tables are made from the live ones (``LIKE ... INCLUDING ...``), so whatever
columns they have when this runs are carried over with their rows; ``seq`` and the
outbox id go on from where their sequences stopped.

A partitioned table's unique keys must contain the partition key, so:

* ``seq`` loses its unique constraint: it still comes from one sequence.
* the Idempotency-Key's uniqueness moves to ``job_idempotency_keys`` (key -> job id),
  written in the statement that writes the job and dropped with the job's partition.
* ``outbox``'s primary key becomes ``(id, created_at)``.

Rows already there: jobs accepted before this release have UUIDv4 ids, which say
nothing about time, so they go to ``jobs_default``, where beat deletes them in small
batches once past retention (the only row-by-row deletes, and only of these rows).
Existing outbox rows go to ``outbox_p00000000000000`` (everything before the current
6-hour window), which is dropped whole like any other.  When there were rows, six-hour
partitions are made four days ahead, so no ATTACH (which scans the default partition)
runs while the old jobs are still in it; on an empty database beat makes them in the
configured width (``JOB_PARTITION_SECONDS``).

The previous release keeps working against this schema except for one thing: its
``INSERT .. ON CONFLICT (idempotency_key)`` has no unique index to infer any more, so
keyed requests fail on it until the web processes are replaced (run the migration
with the new web, or drain keyed traffic first).

Revision ID: 7c1e0a9d5b17
Revises: 5c3e9a7d2b14
Create Date: 2026-12-06 12:40:00.000000

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "7c1e0a9d5b17"
down_revision: Union[str, Sequence[str], None] = "5c3e9a7d2b14"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# As shared.retention.STORAGE (migrations import only models).
STORAGE = (
    "autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_threshold = 10000,"
    " autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.02"
)
WIDTH_HOURS = 6
AHEAD_WINDOWS = 16  # four days of six-hour partitions

# Six-hour partitions from the current window to AHEAD_WINDOWS ahead, named after
# their lower bound, bounds made by {bound} from a UTC timestamp ``t``.
_CREATE_AHEAD = """
DO $$
DECLARE
    first timestamp := date_trunc('day', now() AT TIME ZONE 'UTC')
        + floor(extract(hour FROM now() AT TIME ZONE 'UTC') / {width}) * interval '{width} hours';
    w timestamp;
    lo text;
    hi text;
BEGIN
    FOR w IN SELECT generate_series(first, first + interval '{width} hours' * {ahead},
                                    interval '{width} hours')
    LOOP
        lo := {bound_lo};
        hi := {bound_hi};
        EXECUTE format('CREATE TABLE %I (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)'
                       ' WITH ({storage})', '{table}_p' || to_char(w, 'YYYYMMDDHH24MISS'));
        EXECUTE format('ALTER TABLE {table} ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       '{table}_p' || to_char(w, 'YYYYMMDDHH24MISS'), lo, hi);
    END LOOP;
END $$
"""
# The smallest UUID of a millisecond: 48 bits of epoch ms, then zeros.
_UUID_OF = (
    "regexp_replace(lpad(to_hex((extract(epoch FROM {t}) * 1000)::bigint), 12, '0')"
    " || '00000000000000000000', '^(.{{8}})(.{{4}})(.{{4}})(.{{4}})(.{{12}})$',"
    " '\\1-\\2-\\3-\\4-\\5')"
)
_TIMESTAMP_OF = "CAST({t} AS text) || '+00'"


def _set_aside(table: str, constraints: list[str], indexes: list[str], sequence: str) -> None:
    old = f"{table}_unpartitioned"
    op.rename_table(table, old)
    for name in constraints:
        op.execute(f"ALTER TABLE {old} RENAME CONSTRAINT {name} TO {name}_unpartitioned")
    for name in indexes:
        op.execute(f"ALTER INDEX {name} RENAME TO {name}_unpartitioned")
    op.execute(f"ALTER SEQUENCE {sequence} RENAME TO {sequence}_unpartitioned")


def _like(table: str, partition_by: str) -> None:
    op.execute(
        f"CREATE TABLE {table} (LIKE {table}_unpartitioned INCLUDING DEFAULTS"
        f" INCLUDING IDENTITY INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS)"
        f" PARTITION BY RANGE ({partition_by})"
    )
    op.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT WITH ({STORAGE})")


def _create_ahead(table: str, bound: str) -> None:
    op.execute(
        _CREATE_AHEAD.format(
            table=table,
            width=WIDTH_HOURS,
            ahead=AHEAD_WINDOWS,
            storage=STORAGE,
            bound_lo=bound.format(t="(w AT TIME ZONE 'UTC')")
            if bound is _UUID_OF
            else bound.format(t="w"),
            bound_hi=bound.format(t=f"((w + interval '{WIDTH_HOURS} hours') AT TIME ZONE 'UTC')")
            if bound is _UUID_OF
            else bound.format(t=f"(w + interval '{WIDTH_HOURS} hours')"),
        )
    )


def upgrade() -> None:
    """Upgrade schema."""
    bind = op.get_bind()
    had_jobs = bind.execute(sa.text("SELECT EXISTS (SELECT 1 FROM jobs)")).scalar_one()
    had_outbox = bind.execute(sa.text("SELECT EXISTS (SELECT 1 FROM outbox)")).scalar_one()

    _set_aside(
        "jobs",
        ["pk_jobs", "uq_jobs_seq", "uq_jobs_idempotency_key"],
        ["ix_jobs_pending_partition_seq", "ix_jobs_idempotency_created_at"],
        "jobs_seq_seq",
    )
    _like("jobs", "id")
    op.create_primary_key(op.f("pk_jobs"), "jobs", ["id"])
    op.create_index(
        "ix_jobs_pending_partition_seq",
        "jobs",
        ["partition", "seq"],
        postgresql_where=sa.text("status = 'PENDING'"),
    )
    op.create_table(
        "job_idempotency_keys",
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_job_idempotency_keys")),
    )
    op.create_index("ix_job_idempotency_keys_job_id", "job_idempotency_keys", ["job_id"])
    if had_jobs:
        _create_ahead("jobs", _UUID_OF)
    op.execute("INSERT INTO jobs SELECT * FROM jobs_unpartitioned")
    op.execute(
        "INSERT INTO job_idempotency_keys (key, job_id)"
        " SELECT idempotency_key, id FROM jobs_unpartitioned WHERE idempotency_key IS NOT NULL"
    )
    op.execute(
        "SELECT setval(pg_get_serial_sequence('jobs', 'seq'), last_value, is_called)"
        " FROM jobs_seq_seq_unpartitioned"
    )
    op.drop_table("jobs_unpartitioned")

    _set_aside("outbox", ["pk_outbox"], ["ix_outbox_undelivered"], "outbox_id_seq")
    _like("outbox", "created_at")
    op.create_primary_key(op.f("pk_outbox"), "outbox", ["id", "created_at"])
    op.create_index(
        "ix_outbox_undelivered",
        "outbox",
        ["id"],
        postgresql_where=sa.text("delivered_at IS NULL"),
    )
    if had_outbox:
        # Every row so far in one partition, dropped whole once all are delivered and
        # past retention.
        op.execute(
            f"""
            DO $$
            DECLARE
                first timestamp := date_trunc('day', now() AT TIME ZONE 'UTC')
                    + floor(extract(hour FROM now() AT TIME ZONE 'UTC') / {WIDTH_HOURS})
                      * interval '{WIDTH_HOURS} hours';
            BEGIN
                CREATE TABLE outbox_p00000000000000
                    (LIKE outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS) WITH ({STORAGE});
                EXECUTE format('ALTER TABLE outbox ATTACH PARTITION outbox_p00000000000000'
                               ' FOR VALUES FROM (MINVALUE) TO (%L)', first || '+00');
            END $$
            """
        )
        _create_ahead("outbox", _TIMESTAMP_OF)
    op.execute("INSERT INTO outbox SELECT * FROM outbox_unpartitioned")
    op.execute(
        "SELECT setval(pg_get_serial_sequence('outbox', 'id'), last_value, is_called)"
        " FROM outbox_id_seq_unpartitioned"
    )
    op.drop_table("outbox_unpartitioned")


def downgrade() -> None:
    """Downgrade schema: back to plain tables, with every row still there."""
    for table, key_sql in (
        ("jobs", "PRIMARY KEY (id), CONSTRAINT uq_jobs_seq UNIQUE (seq)"),
        ("outbox", "PRIMARY KEY (id)"),
    ):
        seq = "jobs_seq_seq" if table == "jobs" else "outbox_id_seq"
        op.execute(f"ALTER TABLE {table} RENAME TO {table}_partitioned")
        op.execute(f"ALTER TABLE {table}_partitioned RENAME CONSTRAINT pk_{table} TO pk_{table}_p")
        op.execute(f"ALTER SEQUENCE {seq} RENAME TO {seq}_partitioned")
        index = "ix_jobs_pending_partition_seq" if table == "jobs" else "ix_outbox_undelivered"
        op.execute(f"ALTER INDEX {index} RENAME TO {index}_p")
        op.execute(
            f"CREATE TABLE {table} (LIKE {table}_partitioned INCLUDING DEFAULTS"
            f" INCLUDING IDENTITY INCLUDING CONSTRAINTS, CONSTRAINT pk_{table} {key_sql})"
        )
        op.execute(f"INSERT INTO {table} SELECT * FROM {table}_partitioned")
        op.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', '{'seq' if table == 'jobs' else 'id'}'),"
            f" last_value, is_called) FROM {seq}_partitioned"
        )
        op.execute(f"DROP TABLE {table}_partitioned")
    op.execute(
        "UPDATE jobs SET idempotency_key = NULL WHERE idempotency_key IS NOT NULL"
        " AND id NOT IN (SELECT job_id FROM job_idempotency_keys)"
    )
    op.drop_table("job_idempotency_keys")
    op.create_unique_constraint("uq_jobs_idempotency_key", "jobs", ["idempotency_key"])
    op.create_index(
        "ix_jobs_pending_partition_seq",
        "jobs",
        ["partition", "seq"],
        postgresql_where=sa.text("status = 'PENDING'"),
    )
    op.create_index(
        "ix_jobs_idempotency_created_at",
        "jobs",
        ["created_at"],
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "ix_outbox_undelivered",
        "outbox",
        ["id"],
        postgresql_where=sa.text("delivered_at IS NULL"),
    )
