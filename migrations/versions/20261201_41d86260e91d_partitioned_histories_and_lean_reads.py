"""partitioned histories and lean reads

``order_histories`` and ``point_histories`` become partitioned by month of
``created_at`` (declarative range partitions ``<table>_pYYYYMM`` from the month of the
oldest row to three months ahead, and ``<table>_default`` for anything outside them),
converted with their rows: ids are kept and each identity goes on from where the old
one stopped.  Beat creates later months ahead (``shared.table_partitions``).

A partitioned table's primary and unique keys must contain the partition key, so the
keys that must hold across months move to unpartitioned guard tables that BEFORE
INSERT triggers fill: ``order_history_keys`` (one history row per order and state),
``point_history_keys`` (one history row per job, one PAYMENT row per order).  The
guard rows of the existing rows are written by the conversion.  Deleting a history
row deletes its key (the guards mirror the live rows, as a unique index would);
changing a key column of a history row is refused.

``product_totals`` holds the number of products, kept by statement triggers on
``products``, so an unfiltered listing does not count the table.

Where the server offers ``pg_trgm`` (and lets us create it), a trigram GIN index on
``products.name`` serves the listing's case-insensitive "contains" search; elsewhere
(the embedded server) the search stays a scan.  That index is not in the models: the
Alembic environment leaves it out of ``alembic check``, like the partitions.

The previous release keeps working against this schema: it inserts into the same
tables (through the parents; the triggers write the keys) and its ``ON CONFLICT ON
CONSTRAINT uq_order_histories_order_id_status`` still names a unique constraint.  A
state it delivered twice would now be refused by the trigger rather than skipped; its
outbox marks rows delivered in the transaction that records them, so it never does.

Revision ID: 41d86260e91d
Revises: 1ea64ce0f541
Create Date: 2026-12-01 23:24:12.496213

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "41d86260e91d"
down_revision: Union[str, Sequence[str], None] = "1ea64ce0f541"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

MONTHS_AHEAD = 3  # as shared.table_partitions.MONTHS_AHEAD (migrations import only models)

# Range partitions from the month of the oldest row (or this month) to MONTHS_AHEAD
# months ahead, named <table>_pYYYYMM, bounds at UTC month starts, and the default one.
_CREATE_PARTITIONS = """
DO $$
DECLARE
    first_month timestamp;
    month timestamp;
BEGIN
    SELECT date_trunc('month', coalesce(min(created_at), now()) AT TIME ZONE 'UTC')
      INTO first_month FROM {source};
    FOR month IN SELECT generate_series(
        first_month,
        date_trunc('month', now() AT TIME ZONE 'UTC') + interval '{ahead} months',
        interval '1 month')
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF {table} FOR VALUES FROM (%L) TO (%L)',
            '{table}_p' || to_char(month, 'YYYYMM'),
            month AT TIME ZONE 'UTC',
            (month + interval '1 month') AT TIME ZONE 'UTC');
    END LOOP;
    CREATE TABLE {table}_default PARTITION OF {table} DEFAULT;
END $$
"""

# The identity goes on exactly where the old table's stopped.
_CONTINUE_IDENTITY = """
SELECT setval(pg_get_serial_sequence('{table}', 'id'), last_value, is_called)
FROM {old_sequence}
"""

_ORDER_HISTORY_KEY_TRIGGER = """
CREATE FUNCTION order_histories_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- Rows moved out of the default partition into their month keep their keys.
        IF current_setting('shop.moving_partition_rows', true) IS DISTINCT FROM 'on' THEN
            DELETE FROM order_history_keys
            WHERE order_id = OLD.order_id AND status = OLD.status;
        END IF;
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'the order_id and status of an order history row never change'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    -- A duplicate raises unique_violation on pk_order_history_keys.
    INSERT INTO order_history_keys (order_id, status) VALUES (NEW.order_id, NEW.status);
    RETURN NEW;
END $$;
CREATE TRIGGER order_histories_key
    BEFORE INSERT OR DELETE OR UPDATE OF order_id, status ON order_histories
    FOR EACH ROW EXECUTE FUNCTION order_histories_key();
"""

_POINT_HISTORY_KEYS_TRIGGER = """
CREATE FUNCTION point_histories_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- Rows moved out of the default partition into their month keep their keys.
        IF current_setting('shop.moving_partition_rows', true) IS DISTINCT FROM 'on' THEN
            DELETE FROM point_history_keys WHERE history_id = OLD.id;
        END IF;
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'the id, job_id and order_id of a point history row never change'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.job_id IS NOT NULL OR NEW.order_id IS NOT NULL THEN
        -- A duplicate raises unique_violation on uq_point_history_keys_job_id or
        -- uq_point_history_keys_order_id.
        INSERT INTO point_history_keys (history_id, job_id, order_id)
        VALUES (NEW.id, NEW.job_id, NEW.order_id);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER point_histories_keys
    BEFORE INSERT OR DELETE OR UPDATE OF id, job_id, order_id ON point_histories
    FOR EACH ROW EXECUTE FUNCTION point_histories_keys();
"""

_PRODUCT_TOTALS_TRIGGERS = """
CREATE FUNCTION product_totals_count() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE product_totals SET products = 0 WHERE id = 1;
        RETURN NULL;
    END IF;
    SELECT count(*) INTO n FROM changed;
    IF n > 0 THEN
        UPDATE product_totals
        SET products = products + CASE WHEN TG_OP = 'INSERT' THEN n ELSE -n END
        WHERE id = 1;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER products_counted_insert AFTER INSERT ON products
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION product_totals_count();
CREATE TRIGGER products_counted_delete AFTER DELETE ON products
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION product_totals_count();
CREATE TRIGGER products_counted_truncate AFTER TRUNCATE ON products
    FOR EACH STATEMENT EXECUTE FUNCTION product_totals_count();
"""

# Only where the server has pg_trgm and lets this role create it (trusted since PG 13).
_TRIGRAM_INDEX = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        RAISE NOTICE 'no pg_trgm on this server: name searches scan products';
        RETURN;
    END IF;
    BEGIN
        CREATE EXTENSION IF NOT EXISTS pg_trgm;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'pg_trgm may not be created by this role: name searches scan products';
        RETURN;
    END;
    CREATE INDEX IF NOT EXISTS ix_products_name_trgm ON products USING gin (name gin_trgm_ops);
END $$
"""


def _set_aside(table: str, constraints: list[str], indexes: list[str]) -> None:
    """Rename the unpartitioned table, its constraints, indexes and identity sequence
    out of the way of the new table's names."""
    old = f"{table}_unpartitioned"
    op.rename_table(table, old)
    for name in constraints:
        op.execute(f"ALTER TABLE {old} RENAME CONSTRAINT {name} TO {name}_unpartitioned")
    for name in indexes:
        op.execute(f"ALTER INDEX {name} RENAME TO {name}_unpartitioned")
    op.execute(f"ALTER SEQUENCE {table}_id_seq RENAME TO {old}_id_seq")


def upgrade() -> None:
    """Upgrade schema."""
    _set_aside(
        "order_histories",
        ["pk_order_histories", "uq_order_histories_order_id_status"],
        ["ix_order_histories_order_id"],
    )
    op.create_table(
        "order_histories",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("order_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", "created_at", name=op.f("pk_order_histories")),
        sa.UniqueConstraint(
            "order_id", "status", "created_at", name="uq_order_histories_order_id_status"
        ),
        postgresql_partition_by="RANGE (created_at)",
    )
    op.create_table(
        "order_history_keys",
        sa.Column("order_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.PrimaryKeyConstraint("order_id", "status", name=op.f("pk_order_history_keys")),
    )
    op.execute(
        _CREATE_PARTITIONS.format(
            table="order_histories", source="order_histories_unpartitioned", ahead=MONTHS_AHEAD
        )
    )
    op.execute(
        "INSERT INTO order_histories (id, order_id, status, created_at)"
        " SELECT id, order_id, status, created_at FROM order_histories_unpartitioned"
    )
    op.execute(
        "INSERT INTO order_history_keys (order_id, status)"
        " SELECT order_id, status FROM order_histories_unpartitioned"
    )
    op.execute(
        _CONTINUE_IDENTITY.format(
            table="order_histories", old_sequence="order_histories_unpartitioned_id_seq"
        )
    )
    op.drop_table("order_histories_unpartitioned")
    op.execute(_ORDER_HISTORY_KEY_TRIGGER)

    _set_aside(
        "point_histories",
        ["pk_point_histories", "uq_point_histories_job_id", "uq_point_histories_order_id"],
        ["ix_point_histories_created_at", "ix_point_histories_user_id_id"],
    )
    op.create_table(
        "point_histories",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(length=10), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=True),
        sa.Column("order_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(type = 'PAYMENT') = (order_id IS NOT NULL)",
            name=op.f("ck_point_histories_payment_has_order"),
        ),
        sa.PrimaryKeyConstraint("id", "created_at", name=op.f("pk_point_histories")),
        postgresql_partition_by="RANGE (created_at)",
    )
    op.create_index(
        "ix_point_histories_created_at", "point_histories", ["created_at"], unique=False
    )
    op.create_index(
        "ix_point_histories_user_id_id", "point_histories", ["user_id", "id"], unique=False
    )
    op.create_table(
        "point_history_keys",
        sa.Column("history_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=True),
        sa.Column("order_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("history_id", name=op.f("pk_point_history_keys")),
        sa.UniqueConstraint("job_id", name=op.f("uq_point_history_keys_job_id")),
        sa.UniqueConstraint("order_id", name=op.f("uq_point_history_keys_order_id")),
    )
    op.execute(
        _CREATE_PARTITIONS.format(
            table="point_histories", source="point_histories_unpartitioned", ahead=MONTHS_AHEAD
        )
    )
    op.execute(
        "INSERT INTO point_histories"
        " (id, user_id, type, amount, balance_after, job_id, order_id, created_at)"
        " SELECT id, user_id, type, amount, balance_after, job_id, order_id, created_at"
        " FROM point_histories_unpartitioned"
    )
    op.execute(
        "INSERT INTO point_history_keys (history_id, job_id, order_id)"
        " SELECT id, job_id, order_id FROM point_histories_unpartitioned"
        " WHERE job_id IS NOT NULL OR order_id IS NOT NULL"
    )
    op.execute(
        _CONTINUE_IDENTITY.format(
            table="point_histories", old_sequence="point_histories_unpartitioned_id_seq"
        )
    )
    op.drop_table("point_histories_unpartitioned")
    op.execute(_POINT_HISTORY_KEYS_TRIGGER)

    op.create_table(
        "product_totals",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("products", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_product_totals_one_row")),
        sa.CheckConstraint("products >= 0", name=op.f("ck_product_totals_products_non_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_product_totals")),
    )
    # Counted under a lock that keeps products from changing until the triggers exist.
    op.execute("LOCK TABLE products IN SHARE MODE")
    op.execute("INSERT INTO product_totals (id, products) SELECT 1, count(*) FROM products")
    op.execute(_PRODUCT_TOTALS_TRIGGERS)

    op.execute(_TRIGRAM_INDEX)


def _unpartition(table: str, columns: str, *, create: str) -> None:
    """Copy a partitioned history table back into a plain one of the same name."""
    op.execute(f"ALTER TABLE {table} RENAME TO {table}_partitioned")
    op.execute(f"ALTER TABLE {table}_partitioned RENAME CONSTRAINT pk_{table} TO pk_{table}_p")
    op.execute(create)
    op.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_partitioned")
    op.execute(
        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), last_value, is_called)"
        f" FROM {table}_partitioned_id_seq"
    )
    op.execute(f"DROP TABLE {table}_partitioned CASCADE")


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("DROP INDEX IF EXISTS ix_products_name_trgm")
    op.execute("DROP TRIGGER products_counted_truncate ON products")
    op.execute("DROP TRIGGER products_counted_delete ON products")
    op.execute("DROP TRIGGER products_counted_insert ON products")
    op.execute("DROP FUNCTION product_totals_count()")
    op.drop_table("product_totals")

    op.execute("DROP TRIGGER point_histories_keys ON point_histories")
    op.execute("DROP FUNCTION point_histories_keys()")
    op.execute("ALTER SEQUENCE point_histories_id_seq RENAME TO point_histories_partitioned_id_seq")
    op.execute("ALTER INDEX ix_point_histories_created_at RENAME TO ix_point_histories_created_p")
    op.execute("ALTER INDEX ix_point_histories_user_id_id RENAME TO ix_point_histories_user_id_p")
    _unpartition(
        "point_histories",
        "id, user_id, type, amount, balance_after, job_id, order_id, created_at",
        create="""
        CREATE TABLE point_histories (
            id bigint GENERATED BY DEFAULT AS IDENTITY,
            user_id bigint NOT NULL,
            type varchar(10) NOT NULL,
            amount bigint NOT NULL,
            balance_after bigint NOT NULL,
            job_id uuid,
            created_at timestamptz NOT NULL DEFAULT now(),
            order_id bigint,
            CONSTRAINT pk_point_histories PRIMARY KEY (id),
            CONSTRAINT uq_point_histories_job_id UNIQUE (job_id),
            CONSTRAINT uq_point_histories_order_id UNIQUE (order_id),
            CONSTRAINT ck_point_histories_payment_has_order
                CHECK ((type = 'PAYMENT') = (order_id IS NOT NULL))
        );
        CREATE INDEX ix_point_histories_created_at ON point_histories (created_at);
        CREATE INDEX ix_point_histories_user_id_id ON point_histories (user_id, id);
        """,
    )
    op.drop_table("point_history_keys")

    op.execute("DROP TRIGGER order_histories_key ON order_histories")
    op.execute("DROP FUNCTION order_histories_key()")
    op.execute("ALTER SEQUENCE order_histories_id_seq RENAME TO order_histories_partitioned_id_seq")
    op.execute(
        "ALTER TABLE order_histories RENAME CONSTRAINT uq_order_histories_order_id_status"
        " TO uq_order_histories_order_id_status_p"
    )
    _unpartition(
        "order_histories",
        "id, order_id, status, created_at",
        create="""
        CREATE TABLE order_histories (
            id bigint GENERATED BY DEFAULT AS IDENTITY,
            order_id bigint NOT NULL,
            status varchar(20) NOT NULL,
            created_at timestamptz NOT NULL,
            CONSTRAINT pk_order_histories PRIMARY KEY (id),
            CONSTRAINT uq_order_histories_order_id_status UNIQUE (order_id, status)
        );
        CREATE INDEX ix_order_histories_order_id ON order_histories (order_id);
        """,
    )
    op.drop_table("order_history_keys")
