"""Points: a prepaid balance per user, never negative, never above 10,000,000.

Changes are applied in batches (ARCHITECTURE rule 6): the users' rows are locked
once, every change is decided in arrival order against the locked balances, and
each user's row is written once with the net delta.  Writing a row once per batch
instead of once per change matters: PostgreSQL slows down on a row updated
hundreds of times in one transaction (each update adds a tuple version to walk).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.domain.errors import DomainError, InsufficientPoints, PointLimitExceeded, unwrap
from shared.models import MAX_BALANCE, PointBalance, PointHistory


class PointChange(enum.StrEnum):
    CHARGE = "CHARGE"
    USE = "USE"


@dataclass(frozen=True)
class PointRequest:
    user_id: int
    change: PointChange
    amount: int
    job_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Balance:
    user_id: int
    amount: int


_points = cast(Table, PointBalance.__table__)  # Core UPDATE with executemany parameters
_ADD_DELTA = (
    update(_points)
    .where(_points.c.user_id == bindparam("u"))
    .values(balance=_points.c.balance + bindparam("delta"), updated_at=func.now())
)


def apply_point_requests(
    session: Session, requests: list[PointRequest]
) -> list[Balance | DomainError]:
    """Apply charges and uses in order; one outcome per request, each a new balance or a refusal.

    The rows are locked ``FOR UPDATE`` (ascending user id) before anything is
    decided, so the balances cannot change underneath; each row then gets its net
    delta, and ``ck_points_balance_non_negative`` / ``ck_points_balance_at_most_limit``
    refuse on their own whatever this code decided.  One history row per applied
    change.  Refusals: ``PointLimitExceeded`` (a balance would pass 10,000,000),
    ``InsufficientPoints`` (including a user never charged).
    """
    charged = sorted({r.user_id for r in requests if r.change is PointChange.CHARGE})
    if charged:
        session.execute(
            insert(PointBalance)
            .values([{"user_id": u, "balance": 0} for u in charged])
            .on_conflict_do_nothing()
        )
    users = sorted({r.user_id for r in requests})
    start: dict[int, int] = dict(
        session.execute(
            select(PointBalance.user_id, PointBalance.balance)
            .where(PointBalance.user_id.in_(users))
            .order_by(PointBalance.user_id)
            .with_for_update()
        ).all()
    )
    balances = dict(start)
    outcomes: list[Balance | DomainError] = []
    histories: list[dict[str, object]] = []
    for r in requests:
        current = balances.get(r.user_id, 0)
        if r.change is PointChange.CHARGE:
            new = current + r.amount
            if new > MAX_BALANCE:
                outcomes.append(
                    PointLimitExceeded(f"a balance may not exceed {MAX_BALANCE:,} points")
                )
                continue
        else:
            new = current - r.amount
            if new < 0:
                outcomes.append(
                    InsufficientPoints(f"user {r.user_id} has fewer than {r.amount} points")
                )
                continue
        balances[r.user_id] = new
        histories.append(
            {
                "user_id": r.user_id,
                "type": r.change.value,
                "amount": r.amount,
                "balance_after": new,
                "job_id": r.job_id,
            }
        )
        outcomes.append(Balance(r.user_id, new))
    deltas = [
        {"u": u, "delta": balances[u] - start[u]}
        for u in users
        if balances.get(u, 0) != start.get(u, 0)
    ]
    if deltas:
        session.execute(_ADD_DELTA, deltas)
    if histories:
        session.execute(insert(PointHistory), histories)
    return outcomes


def charge_points(
    session: Session, user_id: int, amount: int, *, job_id: uuid.UUID | None = None
) -> Balance:
    """Add ``amount`` to the user's balance.  Raises ``PointLimitExceeded``."""
    return unwrap(
        apply_point_requests(session, [PointRequest(user_id, PointChange.CHARGE, amount, job_id)])[
            0
        ]
    )


def use_points(
    session: Session, user_id: int, amount: int, *, job_id: uuid.UUID | None = None
) -> Balance:
    """Take ``amount`` from the user's balance.  Raises ``InsufficientPoints``."""
    return unwrap(
        apply_point_requests(session, [PointRequest(user_id, PointChange.USE, amount, job_id)])[0]
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
