"""Order status changes: the state machine, If-Match, and FAILED putting stock back once."""

from __future__ import annotations

import itertools

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.domain.orders import ALLOWED_MOVES, OrderStatus
from shared.models import Order, Outbox, Product
from shared.partitions import HISTORY_QUEUE
from tests.api.conftest import assert_error
from tests.conftest import ADMIN, RecordingPublisher
from tests.factories import OrderFactory, ProductFactory

ALLOWED = {
    (OrderStatus.READY, OrderStatus.PAYMENT_READY),
    (OrderStatus.READY, OrderStatus.FAILED),
    (OrderStatus.PAYMENT_READY, OrderStatus.COMPLETED),
    (OrderStatus.PAYMENT_READY, OrderStatus.FAILED),
}
PAIRS = list(itertools.product(OrderStatus, OrderStatus))


def test_the_domain_table_is_the_one_api_md_gives() -> None:
    assert {(a, b) for a, targets in ALLOWED_MOVES.items() for b in targets} == ALLOWED


def _outbox(session: Session, order_id: int) -> list[str]:
    return list(
        session.execute(
            select(Outbox.status).where(Outbox.order_id == order_id).order_by(Outbox.id)
        ).scalars()
    )


@pytest.mark.parametrize(("current", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_every_transition(
    client: FlaskClient,
    db_session: Session,
    publisher: RecordingPublisher,
    current: OrderStatus,
    target: OrderStatus,
) -> None:
    order = OrderFactory(status=current.value, version=3)
    answer = client.put(f"/v1/orders/{order.id}/status?status={target.value}", headers=ADMIN)
    stored = db_session.get(Order, order.id, populate_existing=True)
    assert stored is not None
    if (current, target) in ALLOWED:
        assert answer.status_code == 200, answer.get_data(as_text=True)
        assert answer.get_json() == {"orderId": order.id, "status": target.value, "version": 4}
        assert answer.headers["ETag"] == '"4"'
        assert (stored.status, stored.version) == (target.value, 4)
        assert _outbox(db_session, order.id) == [target.value]
        assert publisher.woken == [HISTORY_QUEUE]
        fetched = client.get(f"/v1/orders/{order.id}")
        assert fetched.get_json()["status"] == target.value
        assert fetched.headers["ETag"] == '"4"'
    else:
        assert_error(answer, 409, "ORDER_STATE_CONFLICT")
        assert (stored.status, stored.version) == (current.value, 3)
        assert _outbox(db_session, order.id) == []


def test_full_happy_path_bumps_the_version_each_time(client: FlaskClient) -> None:
    order = OrderFactory()
    versions = []
    for status in ("PAYMENT_READY", "COMPLETED"):
        answer = client.put(f"/v1/orders/{order.id}/status?status={status}", headers=ADMIN)
        versions.append(answer.get_json()["version"])
    assert versions == [2, 3]
    assert client.get(f"/v1/orders/{order.id}").get_json()["version"] == 3


def test_failed_puts_the_stock_back_once(client: FlaskClient, db_session: Session) -> None:
    mug, pot = ProductFactory(stock=1), ProductFactory(stock=0)
    order = OrderFactory(lines=[(mug, 2), (pot, 3)])
    # Read through the cache first, so a stale cached stock would show.
    assert client.get(f"/v1/products/{mug.id}").get_json()["stock"] == 1

    answer = client.put(f"/v1/orders/{order.id}/status?status=FAILED", headers=ADMIN)
    assert answer.status_code == 200
    assert client.get(f"/v1/products/{mug.id}").get_json()["stock"] == 3
    assert client.get(f"/v1/products/{pot.id}").get_json()["stock"] == 3

    again = client.put(f"/v1/orders/{order.id}/status?status=FAILED", headers=ADMIN)
    assert_error(again, 409, "ORDER_STATE_CONFLICT")
    stocks = db_session.execute(
        select(Product.stock)
        .where(Product.id.in_([mug.id, pot.id]))
        .order_by(Product.id)
        .execution_options(populate_existing=True)
    ).scalars()
    assert list(stocks) == [3, 3]
    assert client.get(f"/v1/products/{mug.id}").get_json()["stock"] == 3


def test_failed_from_payment_ready_also_restocks(client: FlaskClient, db_session: Session) -> None:
    product = ProductFactory(stock=10)
    order = OrderFactory(status="PAYMENT_READY", lines=[(product, 4)])
    assert (
        client.put(f"/v1/orders/{order.id}/status?status=FAILED", headers=ADMIN).status_code == 200
    )
    db_session.refresh(product)
    assert product.stock == 14


def test_completed_keeps_the_stock_taken(client: FlaskClient, db_session: Session) -> None:
    product = ProductFactory(stock=10)
    order = OrderFactory(status="PAYMENT_READY", lines=[(product, 4)])
    answer = client.put(f"/v1/orders/{order.id}/status?status=COMPLETED", headers=ADMIN)
    assert answer.status_code == 200
    db_session.refresh(product)
    assert product.stock == 10


@pytest.mark.parametrize("header", ["2", '"2"', " 2 ", "02"])
def test_if_match_with_the_current_version_bare_or_quoted(client: FlaskClient, header: str) -> None:
    order = OrderFactory(version=2)
    answer = client.put(
        f"/v1/orders/{order.id}/status?status=PAYMENT_READY",
        headers={**ADMIN, "If-Match": header},
    )
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["version"] == 3


@pytest.mark.parametrize(
    "header", ["1", '"3"', "0", "999999999999999999", "9223372036854775807", "00000000000000000001"]
)
def test_stale_if_match_is_409_and_changes_nothing(
    client: FlaskClient, db_session: Session, header: str
) -> None:
    order = OrderFactory(version=2)
    answer = client.put(
        f"/v1/orders/{order.id}/status?status=PAYMENT_READY",
        headers={**ADMIN, "If-Match": header},
    )
    assert_error(answer, 409, "ORDER_STATE_CONFLICT")
    db_session.refresh(order)
    assert (order.status, order.version) == ("READY", 2)


@pytest.mark.parametrize(
    "header", ["", "abc", "-1", "1.0", '"2', '2"', "*", "W/x", 'W/"2"', "2, 3", "0x2", "²"]
)
def test_malformed_if_match_is_400(client: FlaskClient, db_session: Session, header: str) -> None:
    order = OrderFactory(version=2)
    answer = client.put(
        f"/v1/orders/{order.id}/status?status=PAYMENT_READY",
        headers={**ADMIN, "If-Match": header},
    )
    assert_error(answer, 400, "VALIDATION_ERROR", fields={"If-Match"})
    db_session.refresh(order)
    assert order.version == 2


@pytest.mark.parametrize("query", ["", "?status=", "?status=ready", "?status=SHIPPED", "?x=1"])
def test_missing_or_unknown_status_is_400(client: FlaskClient, query: str) -> None:
    order = OrderFactory()
    answer = client.put(f"/v1/orders/{order.id}/status{query}", headers=ADMIN)
    assert_error(answer, 400, "VALIDATION_ERROR", fields={"status"})


def test_unknown_order_is_404_after_validation(client: FlaskClient) -> None:
    assert_error(
        client.put("/v1/orders/987654321/status?status=FAILED", headers=ADMIN), 404, "NOT_FOUND"
    )
    assert_error(
        client.put("/v1/orders/987654321/status?status=NOPE", headers=ADMIN),
        400,
        "VALIDATION_ERROR",
    )


def test_status_change_needs_the_admin_token(client: FlaskClient, db_session: Session) -> None:
    order = OrderFactory()
    path = f"/v1/orders/{order.id}/status?status=PAYMENT_READY"
    assert_error(client.put(path), 401, "UNAUTHENTICATED")
    assert_error(client.put(path, headers={"Authorization": "Bearer nope"}), 403, "FORBIDDEN")
    db_session.refresh(order)
    assert order.version == 1
    # Other suites commit orders of their own on this database: count this order's rows.
    outbox = select(func.count()).select_from(Outbox).where(Outbox.order_id == order.id)
    assert db_session.execute(outbox).scalar_one() == 0


@pytest.mark.parametrize("body", [{"x": 1}, [1], {"status": "PAYMENT_READY"}])
def test_a_body_on_a_status_change_is_refused_and_changes_nothing(
    client: FlaskClient, db_session: Session, body: object
) -> None:
    order = OrderFactory()
    answer = client.put(
        f"/v1/orders/{order.id}/status?status=PAYMENT_READY", headers=ADMIN, json=body
    )
    assert_error(answer, 400, "VALIDATION_ERROR")
    db_session.refresh(order)
    assert (order.status, order.version) == ("READY", 1)


def test_an_empty_json_object_body_on_a_status_change_is_harmless(client: FlaskClient) -> None:
    order = OrderFactory()
    answer = client.put(
        f"/v1/orders/{order.id}/status?status=PAYMENT_READY", headers=ADMIN, json={}
    )
    assert answer.status_code == 200


@pytest.mark.parametrize("order_id", ["-1", "0", "007", "9223372036854775808"])
def test_an_id_that_cannot_exist_is_checked_after_access(
    client: FlaskClient, order_id: str
) -> None:
    assert_error(client.put(f"/v1/orders/{order_id}/status?status=FAILED"), 401, "UNAUTHENTICATED")
    answer = client.put(f"/v1/orders/{order_id}/status?status=FAILED", headers=ADMIN)
    assert_error(answer, 404, "NOT_FOUND")
