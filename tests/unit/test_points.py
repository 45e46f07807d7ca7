"""Points rules on a real database."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.domain.errors import InsufficientPoints, PointLimitExceeded
from shared.domain.points import charge_points, get_balance, list_point_histories, use_points
from shared.models import MAX_BALANCE, PointBalance, PointHistory


def test_balance_of_a_user_never_charged_is_zero(db_session: Session) -> None:
    assert get_balance(db_session, 424242).amount == 0


def test_charge_then_use_moves_the_balance_and_writes_history(db_session: Session) -> None:
    assert charge_points(db_session, 1, 500).amount == 500
    assert use_points(db_session, 1, 200).amount == 300
    assert get_balance(db_session, 1).amount == 300
    rows, total = list_point_histories(db_session, 1, page=1, size=10)
    assert total == 2
    assert [(r.type, r.amount, r.balance_after) for r in rows] == [
        ("USE", 200, 300),
        ("CHARGE", 500, 500),
    ]


def test_use_more_than_the_balance_fails_and_changes_nothing(db_session: Session) -> None:
    charge_points(db_session, 2, 100)
    with pytest.raises(InsufficientPoints):
        use_points(db_session, 2, 101)
    assert get_balance(db_session, 2).amount == 100


def test_use_by_a_user_never_charged_is_insufficient(db_session: Session) -> None:
    with pytest.raises(InsufficientPoints):
        use_points(db_session, 3, 1)


def test_charge_up_to_the_limit_passes_and_beyond_fails(db_session: Session) -> None:
    for _ in range(10):
        charge_points(db_session, 4, 1_000_000)
    assert get_balance(db_session, 4).amount == MAX_BALANCE
    with pytest.raises(PointLimitExceeded):
        charge_points(db_session, 4, 1)
    assert get_balance(db_session, 4).amount == MAX_BALANCE


def test_history_pages_are_newest_first(db_session: Session) -> None:
    for amount in range(1, 6):
        charge_points(db_session, 5, amount)
    first, total = list_point_histories(db_session, 5, page=1, size=2)
    second, _ = list_point_histories(db_session, 5, page=2, size=2)
    assert total == 5
    assert [r.amount for r in first + second] == [5, 4, 3, 2]


def test_database_refuses_a_negative_balance_on_its_own(db_session: Session) -> None:
    charge_points(db_session, 6, 10)
    with (
        pytest.raises(IntegrityError, match="ck_points_balance_non_negative"),
        db_session.begin_nested(),
    ):
        db_session.execute(
            PointBalance.__table__.update().values(balance=-1).where(PointBalance.user_id == 6)
        )
    count = db_session.execute(
        select(func.count()).select_from(PointHistory).where(PointHistory.user_id == 6)
    )
    assert count.scalar_one() == 1
