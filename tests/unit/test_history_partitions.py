"""The history tables partitioned by month: keys that hold across partitions, partitions
made ahead (and rows moved out of the default one), the product count kept by triggers."""

from __future__ import annotations

import datetime as dt
import uuid

import psycopg
import pytest
from alembic import command
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.domain.history import record_histories_from_outbox
from shared.domain.inventory import LineRequest, create_order
from shared.domain.orders import (
    OrderStatus,
    change_order_status,
    list_order_histories,
    order_histories_query,
)
from shared.domain.products import create_product
from shared.embedded import alembic_config
from shared.models import (
    OrderHistory,
    OrderHistoryKey,
    Outbox,
    PointHistory,
    PointHistoryKey,
    Product,
    ProductTotal,
)
from shared.table_partitions import (
    MONTHS_AHEAD,
    add_months,
    ensure_month_partitions,
    list_partitions,
    month_start,
    partition_name,
)
from tests.databases import scratch_database
from workers.base import Runtime
from workers.beat import create_history_partitions

# Far enough ahead that no partition exists for it unless a test makes one.
FUTURE = dt.datetime(2091, 5, 17, 12, 0, tzinfo=dt.UTC)
PAST = dt.datetime(2020, 1, 5, tzinfo=dt.UTC)


def _user() -> int:
    return uuid.uuid4().int % 10**15 + 1


def _partition_of(session: Session, table: str, **where: object) -> str:
    """The partition that holds the row matching ``where`` (tableoid)."""
    conditions = " AND ".join(f"{k} = :{k}" for k in where)
    return str(
        session.execute(
            text(f"SELECT tableoid::regclass::text FROM {table} WHERE {conditions}"),
            where,
        ).scalar_one()
    )


def _point_row(user: int, **values: object) -> dict[str, object]:
    return {"user_id": user, "type": "CHARGE", "amount": 1, "balance_after": 1, **values}


# ---- the keys that must hold across partitions ------------------------------------------


def test_a_job_cannot_leave_two_point_histories_even_months_apart(db_session: Session) -> None:
    user, job = _user(), uuid.uuid4()
    db_session.execute(insert(PointHistory).values(_point_row(user, job_id=job)))
    with (
        pytest.raises(IntegrityError, match="uq_point_history_keys_job_id"),
        db_session.begin_nested(),
    ):
        db_session.execute(
            insert(PointHistory).values(_point_row(user, job_id=job, created_at=FUTURE))
        )
    assert db_session.get(PointHistoryKey, _history_id(db_session, job)) is not None


def _history_id(session: Session, job: uuid.UUID) -> int:
    return int(
        session.execute(select(PointHistory.id).where(PointHistory.job_id == job)).scalar_one()
    )


def test_an_order_cannot_be_debited_twice_even_months_apart(db_session: Session) -> None:
    user = _user()
    payment = _point_row(user, type="PAYMENT", amount=0, order_id=2**40 + _user())
    db_session.execute(insert(PointHistory).values(payment))
    with (
        pytest.raises(IntegrityError, match="uq_point_history_keys_order_id"),
        db_session.begin_nested(),
    ):
        db_session.execute(insert(PointHistory).values({**payment, "created_at": FUTURE}))


def test_point_histories_without_job_or_order_need_no_key(db_session: Session) -> None:
    user = _user()
    db_session.execute(insert(PointHistory).values([_point_row(user), _point_row(user)]))
    ids = db_session.execute(select(PointHistory.id).where(PointHistory.user_id == user)).scalars()
    assert (
        db_session.execute(
            select(func.count())
            .select_from(PointHistoryKey)
            .where(PointHistoryKey.history_id.in_(list(ids)))
        ).scalar_one()
        == 0
    )


def test_a_deleted_history_row_frees_its_key_and_keys_never_change(db_session: Session) -> None:
    user, job = _user(), uuid.uuid4()
    db_session.execute(insert(PointHistory).values(_point_row(user, job_id=job)))
    with pytest.raises(IntegrityError, match="never change"), db_session.begin_nested():
        db_session.execute(
            update(PointHistory).where(PointHistory.job_id == job).values(job_id=uuid.uuid4())
        )
    db_session.execute(delete(PointHistory).where(PointHistory.job_id == job))
    assert (
        db_session.execute(select(PointHistoryKey).where(PointHistoryKey.job_id == job)).first()
        is None
    )
    db_session.execute(insert(PointHistory).values(_point_row(user, job_id=job, created_at=FUTURE)))


def test_an_order_state_cannot_have_two_history_rows_even_months_apart(db_session: Session) -> None:
    order_id = 2**41 + _user()
    row = {"order_id": order_id, "status": "READY"}
    db_session.execute(insert(OrderHistory).values(created_at=func.now(), **row))
    with pytest.raises(IntegrityError, match="pk_order_history_keys"), db_session.begin_nested():
        db_session.execute(insert(OrderHistory).values(created_at=FUTURE, **row))
    assert db_session.get(OrderHistoryKey, (order_id, "READY")) is not None
    with pytest.raises(IntegrityError, match="never change"), db_session.begin_nested():
        db_session.execute(
            update(OrderHistory).where(OrderHistory.order_id == order_id).values(status="FAILED")
        )


def test_delivery_skips_a_state_recorded_in_another_partition(db_session: Session) -> None:
    db_session.execute(
        update(Outbox).where(Outbox.delivered_at.is_(None)).values(delivered_at=func.now())
    )
    product = create_product(db_session, name="P", price=1, stock=5)
    order = create_order(db_session, _user(), [LineRequest(product.id, 1)])
    # The READY state already recorded, in a later month's partition (say, by a relay).
    db_session.execute(
        insert(OrderHistory).values(order_id=order.id, status="READY", created_at=FUTURE)
    )
    assert record_histories_from_outbox(db_session, 100) == 1
    count = select(func.count()).select_from(OrderHistory).where(OrderHistory.order_id == order.id)
    assert db_session.execute(count).scalar_one() == 1


def test_order_histories_are_read_from_the_orders_months_only(db_session: Session) -> None:
    # Partitions of an old and of a far month, each holding another order's row.
    for moment in (PAST, FUTURE):
        ensure_month_partitions(db_session, now=moment, months_ahead=0)
        db_session.execute(
            insert(OrderHistory).values(order_id=2**43 + _user(), status="READY", created_at=moment)
        )
    product = create_product(db_session, name="P", price=1, stock=5)
    order = create_order(db_session, _user(), [LineRequest(product.id, 1)])
    change_order_status(db_session, order.id, OrderStatus.PAYMENT_READY, expected_version=None)
    record_histories_from_outbox(db_session, 100)
    states = [h.status for h in list_order_histories(db_session, order.id)]
    assert states == ["READY", "PAYMENT_READY"]

    statement = order_histories_query(order.id).compile(
        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
    )
    plan = db_session.execute(text(f"EXPLAIN (ANALYZE, COSTS OFF) {statement}")).scalars().all()
    for moment in (PAST, FUTURE):
        scans = [line for line in plan if partition_name("order_histories", moment) in line]
        assert scans, plan
        assert all("never executed" in line for line in scans), plan


# ---- partitions ahead -------------------------------------------------------------------


def test_month_arithmetic() -> None:
    assert month_start(dt.datetime(2026, 12, 31, 23, 59, tzinfo=dt.UTC)) == dt.datetime(
        2026, 12, 1, tzinfo=dt.UTC
    )
    # 00:30 on Jan 1st in UTC+1 is still December in UTC.
    plus_one = dt.timezone(dt.timedelta(hours=1))
    assert month_start(dt.datetime(2027, 1, 1, 0, 30, tzinfo=plus_one)).month == 12
    assert add_months(dt.datetime(2026, 11, 1, tzinfo=dt.UTC), 3) == dt.datetime(
        2027, 2, 1, tzinfo=dt.UTC
    )
    assert partition_name("order_histories", dt.datetime(2027, 2, 1, tzinfo=dt.UTC)) == (
        "order_histories_p202702"
    )


def test_the_migration_made_this_month_and_the_next_ones(db_session: Session) -> None:
    first = month_start(db_session.execute(select(func.now())).scalar_one())
    for table in ("order_histories", "point_histories"):
        names = set(list_partitions(db_session, table))
        assert f"{table}_default" in names
        assert {
            partition_name(table, add_months(first, n)) for n in range(MONTHS_AHEAD + 1)
        } <= names


def test_partitions_ahead_are_made_once_and_take_their_rows_from_the_default(
    db_session: Session,
) -> None:
    user, job = _user(), uuid.uuid4()
    db_session.execute(insert(PointHistory).values(_point_row(user, job_id=job, created_at=FUTURE)))
    db_session.execute(
        insert(OrderHistory).values(order_id=2**42 + user, status="READY", created_at=FUTURE)
    )
    assert _partition_of(db_session, "point_histories", job_id=job) == "point_histories_default"

    created = ensure_month_partitions(db_session, now=FUTURE)
    months = [add_months(month_start(FUTURE), n) for n in range(MONTHS_AHEAD + 1)]
    assert created == [
        partition_name(t, m) for t in ("order_histories", "point_histories") for m in months
    ]
    assert ensure_month_partitions(db_session, now=FUTURE) == []

    # The rows moved into their month, and kept their keys: the guard still refuses.
    assert _partition_of(db_session, "point_histories", job_id=job) == "point_histories_p209105"
    assert _partition_of(db_session, "order_histories", order_id=2**42 + user) == (
        "order_histories_p209105"
    )
    with (
        pytest.raises(IntegrityError, match="uq_point_history_keys_job_id"),
        db_session.begin_nested(),
    ):
        db_session.execute(insert(PointHistory).values(_point_row(user, job_id=job)))
    # New rows of that month go to its partition.
    other = uuid.uuid4()
    db_session.execute(
        insert(PointHistory).values(_point_row(user, job_id=other, created_at=FUTURE))
    )
    assert _partition_of(db_session, "point_histories", job_id=other) == "point_histories_p209105"


def test_beat_creates_what_is_missing(runtime: Runtime) -> None:
    # The migration made this month and the next ones: nothing is missing now.
    assert create_history_partitions(runtime) == []


# ---- the product count ----------------------------------------------------------------


def test_product_totals_follow_inserts_and_deletes(db_session: Session) -> None:
    def total() -> int:
        return int(db_session.execute(select(ProductTotal.products)).scalar_one())

    def counted() -> int:
        return int(db_session.execute(select(func.count()).select_from(Product)).scalar_one())

    assert total() == counted()
    create_product(db_session, name="one", price=1, stock=1)
    db_session.execute(
        insert(Product).values([{"name": f"bulk {i}", "price": 1, "stock": 1} for i in range(5)])
    )
    assert total() == counted()
    db_session.execute(delete(Product).where(Product.name.like("bulk %")))
    assert total() == counted()
    with (
        pytest.raises(IntegrityError, match="ck_product_totals_one_row"),
        db_session.begin_nested(),
    ):
        db_session.execute(insert(ProductTotal).values(id=2, products=0))


# ---- the migration converts tables that hold rows ------------------------------------------

PREVIOUS = "1ea64ce0f541"  # the revision before the partitioning


def test_the_migration_converts_the_histories_with_their_rows_and_back(
    server_urls: tuple[str, str],
) -> None:
    with scratch_database(server_urls[0], f"convert_{uuid.uuid4().hex[:8]}") as url:
        command.upgrade(alembic_config(url), PREVIOUS)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO products (name, price, stock) SELECT 'p' || g, 1, 1"
                " FROM generate_series(1, 7) g"
            )
            # Rows of five months, older than the partitions the migration makes ahead.
            conn.execute(
                "INSERT INTO order_histories (order_id, status, created_at)"
                " SELECT g, 'READY', now() - (g || ' weeks')::interval"
                " FROM generate_series(1, 20) g"
            )
            conn.execute(
                "INSERT INTO point_histories (user_id, type, amount, balance_after, job_id,"
                " order_id, created_at)"
                " SELECT g % 3, CASE WHEN g % 2 = 0 THEN 'PAYMENT' ELSE 'CHARGE' END, 1, 1,"
                " gen_random_uuid(), CASE WHEN g % 2 = 0 THEN g END,"
                " now() - (g || ' weeks')::interval FROM generate_series(1, 20) g"
            )
            conn.execute("SELECT nextval('order_histories_id_seq')")  # a gap: ids go on after it
            before = _snapshot(conn)

        command.upgrade(alembic_config(url), "head")
        with psycopg.connect(url, autocommit=True) as conn:
            assert _snapshot(conn) == before
            months = conn.execute(
                "SELECT count(DISTINCT date_trunc('month', created_at, 'UTC'))"
                " FROM order_histories_default"
            ).fetchone()
            assert months == (0,)  # every row is in its month's partition
            assert conn.execute("SELECT count(*) FROM order_history_keys").fetchone() == (20,)
            assert conn.execute("SELECT count(*) FROM point_history_keys").fetchone() == (20,)
            assert conn.execute("SELECT products FROM product_totals").fetchone() == (7,)
            new_id = conn.execute(
                "INSERT INTO order_histories (order_id, status, created_at)"
                " VALUES (1, 'FAILED', now()) RETURNING id"
            ).fetchone()
            assert new_id == (22,)  # 20 rows and the gap: the identity went on
            with pytest.raises(psycopg.errors.UniqueViolation, match="pk_order_history_keys"):
                conn.execute(
                    "INSERT INTO order_histories (order_id, status, created_at)"
                    " VALUES (3, 'READY', now())"
                )
            conn.execute("DELETE FROM order_histories WHERE id = 22")

        command.downgrade(alembic_config(url), PREVIOUS)
        with psycopg.connect(url, autocommit=True) as conn:
            assert _snapshot(conn) == before
            with pytest.raises(psycopg.errors.UniqueViolation, match="uq_point_histories_job_id"):
                conn.execute(
                    "INSERT INTO point_histories (user_id, type, amount, balance_after, job_id)"
                    " SELECT 1, 'CHARGE', 1, 1, job_id FROM point_histories LIMIT 1"
                )
        command.upgrade(alembic_config(url), "head")


def _snapshot(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[object, ...]:
    orders = conn.execute("SELECT * FROM order_histories ORDER BY id").fetchall()
    points = conn.execute(
        "SELECT id, user_id, type, amount, balance_after, job_id, order_id, created_at"
        " FROM point_histories ORDER BY id"
    ).fetchall()
    return (orders, points)
