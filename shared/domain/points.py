"""Points: a prepaid balance per user, never negative, never above 10,000,000."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.domain.errors import InsufficientPoints, PointLimitExceeded
from shared.models import MAX_BALANCE, PointBalance, PointHistory


class PointChange(enum.StrEnum):
    CHARGE = "CHARGE"
    USE = "USE"


@dataclass(frozen=True)
class Balance:
    user_id: int
    amount: int


def charge_points(
    session: Session, user_id: int, amount: int, *, job_id: uuid.UUID | None = None
) -> Balance:
    """Add ``amount`` to the user's balance and write one history row.

    Guarded in SQL (rule 2): the UPDATE only matches while the new balance stays
    within ``MAX_BALANCE``, and ``ck_points_balance_at_most_limit`` backs it up.
    Raises ``PointLimitExceeded``.
    """
    session.execute(
        insert(PointBalance).values(user_id=user_id, balance=0).on_conflict_do_nothing()
    )
    new_balance = session.execute(
        update(PointBalance)
        .where(PointBalance.user_id == user_id, PointBalance.balance + amount <= MAX_BALANCE)
        .values(balance=PointBalance.balance + amount, updated_at=func.now())
        .returning(PointBalance.balance)
    ).scalar_one_or_none()
    if new_balance is None:
        raise PointLimitExceeded(f"a balance may not exceed {MAX_BALANCE:,} points")
    _write_history(
        session,
        user_id=user_id,
        change=PointChange.CHARGE,
        amount=amount,
        balance_after=new_balance,
        job_id=job_id,
    )
    return Balance(user_id, new_balance)


def use_points(
    session: Session, user_id: int, amount: int, *, job_id: uuid.UUID | None = None
) -> Balance:
    """Take ``amount`` from the user's balance and write one history row.

    Guarded by ``balance >= amount`` in the UPDATE and ``ck_points_balance_non_negative``.
    Raises ``InsufficientPoints`` (also for a user never charged).
    """
    new_balance = session.execute(
        update(PointBalance)
        .where(PointBalance.user_id == user_id, PointBalance.balance >= amount)
        .values(balance=PointBalance.balance - amount, updated_at=func.now())
        .returning(PointBalance.balance)
    ).scalar_one_or_none()
    if new_balance is None:
        raise InsufficientPoints(f"user {user_id} has fewer than {amount} points")
    _write_history(
        session,
        user_id=user_id,
        change=PointChange.USE,
        amount=amount,
        balance_after=new_balance,
        job_id=job_id,
    )
    return Balance(user_id, new_balance)


def _write_history(
    session: Session,
    *,
    user_id: int,
    change: PointChange,
    amount: int,
    balance_after: int,
    job_id: uuid.UUID | None,
) -> None:
    session.execute(
        insert(PointHistory).values(
            user_id=user_id,
            type=change.value,
            amount=amount,
            balance_after=balance_after,
            job_id=job_id,
        )
    )


def get_balance(session: Session, user_id: int) -> Balance:
    """The user's balance; 0 for a user never charged."""
    balance = session.execute(
        select(PointBalance.balance).where(PointBalance.user_id == user_id)
    ).scalar_one_or_none()
    return Balance(user_id, balance or 0)


def list_point_histories(
    session: Session, user_id: int, *, page: int, size: int
) -> tuple[list[PointHistory], int]:
    """One page of the user's point changes, newest first, and the total count."""
    total = session.execute(
        select(func.count()).select_from(PointHistory).where(PointHistory.user_id == user_id)
    ).scalar_one()
    rows = session.execute(
        select(PointHistory)
        .where(PointHistory.user_id == user_id)
        .order_by(PointHistory.id.desc())
        .offset((page - 1) * size)
        .limit(size)
    ).scalars()
    return list(rows), int(total)
