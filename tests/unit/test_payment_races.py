"""The database serializes a payment with an admin change and with the expiry.

A payment runs on the user's partition and the order lives on a product partition,
so nothing in the queue orders them.  Here each pair really overlaps on separate
connections, against committed rows: the first holds its transaction open until
the second is seen waiting on the order row's lock (pg_stat_activity), then
commits; the second must then lose cleanly, and the books must balance.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.domain.errors import DomainError, ErrorCode, OrderStateConflict
from shared.domain.inventory import LineRequest, create_order
from shared.domain.orders import OrderStatus, change_order_status, expire_order
from shared.domain.payments import Payment, PaymentRequest, apply_user_requests
from shared.domain.points import Balance, charge_points, get_balance
from shared.domain.products import create_product, get_product
from shared.models import Order, Outbox, PointHistory


@pytest.fixture
def committed(engine: Engine) -> sessionmaker[Session]:
    """Sessions that really commit (unique ids per test: nothing collides)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def _backend_pid(session: Session) -> int:
    pid: int = session.execute(select(func.pg_backend_pid())).scalar_one()
    return pid


def _wait_until_blocked(engine: Engine, pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
            ).scalar_one_or_none()
            if waiting == "Lock":
                return
            time.sleep(0.01)
    pytest.fail(f"backend {pid} never waited on a lock")


def _setup(committed: sessionmaker[Session], *, due_in: float | None = None) -> dict[str, int]:
    user = uuid.uuid4().int % 10**15 + 1
    with committed() as session, session.begin():
        product = create_product(session, name="race", price=100, stock=10)
        order = create_order(session, user, [LineRequest(product.id, 4)])
        charge_points(session, user, 1_000)
        if due_in is not None:
            session.execute(
                update(Order)
                .where(Order.id == order.id)
                .values(expires_at=func.clock_timestamp() + text(f"interval '{due_in} seconds'"))
            )
    return {"user": user, "product": product.id, "order": order.id}


def _run_second(
    committed: sessionmaker[Session], engine: Engine, second: Callable[[Session], Any]
) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``second`` on its own connection; return once it waits on a lock."""
    box: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        with committed() as session:
            try:
                with session.begin():
                    box["pid"] = _backend_pid(session)  # the transaction's connection
                    ready.set()
                    box["outcome"] = second(session)
            except Exception as exc:  # the outcome under test, checked by the caller
                box["outcome"] = exc
            finally:
                ready.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert ready.wait(20)
    assert "pid" in box, box
    _wait_until_blocked(engine, box["pid"])
    return thread, box


def _pay(session: Session, ids: dict[str, int]) -> Payment | DomainError:
    outcome = apply_user_requests(session, [PaymentRequest(ids["user"], ids["order"])]).outcomes[0]
    assert not isinstance(outcome, Balance)
    return outcome


def _books(committed: sessionmaker[Session], ids: dict[str, int]) -> tuple[str, int, int, int, int]:
    with committed() as session:
        order = session.get_one(Order, ids["order"])
        debits = session.execute(
            select(func.count()).where(PointHistory.order_id == ids["order"])
        ).scalar_one()
        outbox = session.execute(
            select(func.count()).where(Outbox.order_id == ids["order"])
        ).scalar_one()
        return (
            order.status,
            get_product(session, ids["product"]).stock,
            get_balance(session, ids["user"]).amount,
            int(debits),
            int(outbox),
        )


def _wait_for_the_clock(engine: Engine, order_id: int, timeout: float = 20) -> None:
    """Until the database's clock has passed the order's expiresAt (polled)."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            if conn.execute(
                text("SELECT expires_at <= clock_timestamp() FROM orders WHERE id = :o"),
                {"o": order_id},
            ).scalar_one():
                return
            time.sleep(0.01)
    pytest.fail("the order never came due")


@pytest.mark.parametrize("round_", range(3))
def test_a_payment_holding_the_order_beats_an_admin_failed(
    committed: sessionmaker[Session], engine: Engine, round_: int
) -> None:
    ids = _setup(committed)
    with committed() as first, first.begin():
        paid = _pay(first, ids)
        assert isinstance(paid, Payment)
        thread, box = _run_second(
            committed,
            engine,
            lambda s: change_order_status(
                s, ids["order"], OrderStatus.FAILED, expected_version=None
            ),
        )
    thread.join(30)
    assert isinstance(box["outcome"], OrderStateConflict)
    assert _books(committed, ids) == ("COMPLETED", 6, 600, 1, 2)


@pytest.mark.parametrize("round_", range(3))
def test_an_admin_failed_holding_the_order_beats_a_payment(
    committed: sessionmaker[Session], engine: Engine, round_: int
) -> None:
    ids = _setup(committed)
    with committed() as first, first.begin():
        change_order_status(first, ids["order"], OrderStatus.FAILED, expected_version=1)
        thread, box = _run_second(committed, engine, lambda s: _pay(s, ids))
    thread.join(30)
    assert isinstance(box["outcome"], DomainError)
    assert box["outcome"].code is ErrorCode.ORDER_NOT_PAYABLE
    assert _books(committed, ids) == ("FAILED", 10, 1_000, 0, 2)


@pytest.mark.parametrize("round_", range(3))
def test_a_payment_holding_the_order_beats_the_expiry_that_listed_it(
    committed: sessionmaker[Session], engine: Engine, round_: int
) -> None:
    ids = _setup(committed, due_in=0.5)
    with committed() as first, first.begin():
        paid = _pay(first, ids)  # decided before expiresAt
        assert isinstance(paid, Payment)
        _wait_for_the_clock(engine, ids["order"])  # now the expiry lists it (version 1)
        thread, box = _run_second(committed, engine, lambda s: expire_order(s, ids["order"], 1))
    thread.join(30)
    assert box["outcome"] is None  # lost: nothing written
    assert _books(committed, ids) == ("COMPLETED", 6, 600, 1, 2)


@pytest.mark.parametrize("round_", range(3))
def test_the_expiry_holding_the_order_beats_a_payment(
    committed: sessionmaker[Session], engine: Engine, round_: int
) -> None:
    ids = _setup(committed, due_in=-1)
    with committed() as first, first.begin():
        assert expire_order(first, ids["order"], 1) == [ids["product"]]
        thread, box = _run_second(committed, engine, lambda s: _pay(s, ids))
    thread.join(30)
    assert isinstance(box["outcome"], DomainError)
    assert box["outcome"].code is ErrorCode.ORDER_NOT_PAYABLE
    assert _books(committed, ids) == ("FAILED", 10, 1_000, 0, 2)
