"""The schema.  Constraints here are the last guard of every invariant (ARCHITECTURE rule 2).

Constraint names come from the naming convention, so an ``IntegrityError`` is
translated to a business outcome by constraint name, never by message text.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NOW = text("now()")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dt.datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
    }


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (
        CheckConstraint("stock >= 0", name="stock_non_negative"),
        CheckConstraint("price >= 0", name="price_non_negative"),
        Index("ix_products_name", "name"),
        Index("ix_products_price_id", "price", "id"),
        Index("ix_products_created_at_id", "created_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    price: Mapped[int] = mapped_column(BigInteger)
    stock: Mapped[int] = mapped_column(BigInteger)
    # Bumped by every change; the read cache refuses to store an older version.
    version: Mapped[int] = mapped_column(BigInteger, server_default=text("1"))
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)


class ProductTotal(Base):
    """How many products there are, kept by statement triggers on ``products`` (the
    migration creates them): an unfiltered listing's ``total`` without counting the table.

    One row (``id = 1``); every INSERT statement adds its rows' count, every DELETE takes
    them off, TRUNCATE sets 0, in the transaction that changed ``products`` (so it is
    exact in every snapshot, a replica's included)."""

    __tablename__ = "product_totals"
    __table_args__ = (
        CheckConstraint("id = 1", name="one_row"),
        CheckConstraint("products >= 0", name="products_non_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    products: Mapped[int] = mapped_column(BigInteger)


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        Index("ix_orders_user_id", "user_id"),
        # Only unpaid orders carry expires_at, so the expiry's scan is a short range scan
        # of a small index (``expires_at <= now()``), whatever the number of orders.
        Index(
            "ix_orders_expires_at", "expires_at", postgresql_where=text("expires_at IS NOT NULL")
        ),
        # A payment is recorded whole, on a COMPLETED order, and adds up to its total.
        CheckConstraint(
            "paid_at IS NULL OR (status = 'COMPLETED' AND paid_amount >= 0"
            " AND discount_amount >= 0 AND paid_amount + discount_amount = total_price)",
            name="payment_adds_up",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20))
    # Optimistic lock: 1 at creation, +1 per status change.
    version: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    total_price: Mapped[int] = mapped_column(BigInteger)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    # When an unpaid order expires; NULL once it is COMPLETED or FAILED.
    expires_at: Mapped[dt.datetime | None] = mapped_column()
    # The payment with points (NULL unless paid through POST .../payment).
    paid_amount: Mapped[int | None] = mapped_column(BigInteger)
    discount_amount: Mapped[int | None] = mapped_column(BigInteger)
    coupon_id: Mapped[int | None] = mapped_column(BigInteger)
    paid_at: Mapped[dt.datetime | None] = mapped_column()


class OrderLine(Base):
    __tablename__ = "order_lines"

    order_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True
    )
    product_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price: Mapped[int] = mapped_column(BigInteger)


# The history tables are partitioned by month of ``created_at`` (range partitions
# ``<table>_pYYYYMM`` and a ``<table>_default`` catch-all; ``shared.table_partitions``
# creates them ahead, the migration created the first ones).  A partitioned table's
# primary key and unique keys must contain the partition key, so the keys that have to
# hold across partitions live in small unpartitioned guard tables, filled by a BEFORE
# INSERT trigger on the history table (the migration creates the triggers): the schema
# refuses a duplicate whichever code inserts it.
PARTITIONED_BY_MONTH = {"postgresql_partition_by": "RANGE (created_at)"}


class OrderHistory(Base):
    __tablename__ = "order_histories"
    __table_args__ = (
        # Unique within a partition only (it must contain created_at): one state of one
        # order at one time.  Also the index of the reads by order_id.  The key that holds
        # across partitions is ``order_history_keys``.
        UniqueConstraint(
            "order_id", "status", "created_at", name="uq_order_histories_order_id_status"
        ),
        PARTITIONED_BY_MONTH,
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20))
    # The outbox row's created_at: when the state was entered (also the partition key).
    created_at: Mapped[dt.datetime] = mapped_column(primary_key=True)


class OrderHistoryKey(Base):
    """One row per ``(order_id, status)`` ever recorded in ``order_histories``: every
    state an order enters gets exactly one history row, across partitions (rule 4).

    Written only by the trigger ``order_histories_key`` (a duplicate raises on
    ``pk_order_history_keys``)."""

    __tablename__ = "order_history_keys"

    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    status: Mapped[str] = mapped_column(String(20), primary_key=True)


class Outbox(Base):
    """An order state entered, written in the transaction that entered it (rule 4)."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index(
            "ix_outbox_undelivered",
            "id",
            postgresql_where=text("delivered_at IS NULL"),
        ),
        # Time partitions dropped whole once delivered and past retention
        # (shared.retention); the key must contain created_at.
        {"postgresql_partition_by": "RANGE (created_at)"},
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW, primary_key=True)
    delivered_at: Mapped[dt.datetime | None] = mapped_column()


MAX_BALANCE = 10_000_000


class PointBalance(Base):
    __tablename__ = "points"
    __table_args__ = (
        CheckConstraint("balance >= 0", name="balance_non_negative"),
        CheckConstraint(f"balance <= {MAX_BALANCE}", name="balance_at_most_limit"),
    )

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)


class PointHistory(Base):
    __tablename__ = "point_histories"
    __table_args__ = (
        Index("ix_point_histories_user_id_id", "user_id", "id"),
        Index("ix_point_histories_created_at", "created_at"),
        CheckConstraint("(type = 'PAYMENT') = (order_id IS NOT NULL)", name="payment_has_order"),
        PARTITIONED_BY_MONTH,
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(10))
    amount: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    # One history row per applied job, and one PAYMENT row per order: both kept across
    # partitions by ``point_history_keys``.
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # The order a PAYMENT paid.
    order_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW, primary_key=True)


class PointHistoryKey(Base):
    """The keys of ``point_histories`` that must hold across its partitions.

    Written only by the trigger ``point_histories_keys``, for each history row that has
    a job or an order: ``uq_point_history_keys_job_id``, one history row per applied job
    even if a job were ever applied twice; ``uq_point_history_keys_order_id``, one debit
    (PAYMENT row) per order.  Either refusal rolls back the statement that inserted the
    history row, and with it the batch that would have applied the change twice.
    """

    __tablename__ = "point_history_keys"

    history_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), unique=True)
    order_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)


class Coupon(Base):
    __tablename__ = "coupons"
    __table_args__ = (
        CheckConstraint("issued_quantity <= total_quantity", name="not_over_issued"),
        CheckConstraint("issued_quantity >= 0", name="issued_non_negative"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    discount_amount: Mapped[int] = mapped_column(BigInteger)
    total_quantity: Mapped[int] = mapped_column(BigInteger)
    issued_quantity: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)


class UserCoupon(Base):
    __tablename__ = "user_coupons"
    __table_args__ = (
        UniqueConstraint("coupon_id", "user_id"),
        Index("ix_user_coupons_user_id_id", "user_id", "id"),
        CheckConstraint("(used_at IS NULL) = (order_id IS NULL)", name="used_by_an_order"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    coupon_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("coupons.id"))
    user_id: Mapped[int] = mapped_column(BigInteger)
    issued_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    # Set once, by the payment that used it; unique: an order uses at most one coupon.
    used_at: Mapped[dt.datetime | None] = mapped_column()
    order_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("orders.id"), unique=True)


class ProductSales(Base):
    """Units ordered per product per UTC hour, net of FAILED orders (the best-seller aggregate).

    Written with the order (``shared.domain.sales``) in the transaction that takes or gives
    back its stock, while the product rows are locked, so its rows are never contended
    beyond the product locks.  The ranking sums at most ``days * 24 + 1`` hours of it.
    """

    __tablename__ = "product_sales"
    __table_args__ = (CheckConstraint("units >= 0", name="units_non_negative"),)

    # Hour first: the ranking reads a range of hours.
    hour: Mapped[dt.datetime] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    units: Mapped[int] = mapped_column(BigInteger)


class Job(Base):
    """The truth about an accepted mutation; the broker message only wakes its consumer."""

    __tablename__ = "jobs"
    __table_args__ = (
        # The consumer's read of its partition, in commit order, and the sweeper's scan.
        Index(
            "ix_jobs_pending_partition_seq",
            "partition",
            "seq",
            postgresql_where=text("status = 'PENDING'"),
        ),
        # Partitioned by range of the time-ordered id (UUIDv7, shared.retention): a read
        # by id touches one partition, and old partitions are dropped whole.
        {"postgresql_partition_by": "RANGE (id)"},
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    # Commit order within a queue; from one sequence, so unique without a unique index
    # (which would have to contain the partition key).
    seq: Mapped[int] = mapped_column(BigInteger, Identity())
    kind: Mapped[str] = mapped_column(String(20))
    partition: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(10), server_default=text("'PENDING'"))
    result: Mapped[dict[str, Any] | None] = mapped_column()
    error: Mapped[dict[str, Any] | None] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Unique across partitions through ``job_idempotency_keys`` (JobIdempotencyKey).
    idempotency_key: Mapped[str | None] = mapped_column(String(300))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    # The channel of the web process waiting for the outcome (``Prefer: wait``).
    reply_to: Mapped[str | None] = mapped_column(String(100))
    # Whose job it is (AUTH_MODE=jwt: only they and admins read its status); None: admin's.
    user_id: Mapped[int | None] = mapped_column(BigInteger)


class JobIdempotencyKey(Base):
    """One row per Idempotency-Key scope in use: the key that holds across the time
    partitions of ``jobs``.  Written with its job in one statement
    (``shared.jobs.record``); removed with the partition that held the job
    (``shared.retention``), so a key lives exactly as long as its job."""

    __tablename__ = "job_idempotency_keys"
    __table_args__ = (Index("ix_job_idempotency_keys_job_id", "job_id"),)

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
