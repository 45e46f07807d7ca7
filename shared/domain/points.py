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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from sqlalchemy import BigInteger, Select, Table, func, insert, select, text
from sqlalchemy.orm import Session

from shared.domain.batch_rows import any_of
from shared.domain.errors import DomainError, InsufficientPoints, PointLimitExceeded, unwrap
from shared.models import MAX_BALANCE, PointBalance, PointHistory


class PointChange(enum.StrEnum):
    CHARGE = "CHARGE"
    USE = "USE"
    PAYMENT = "PAYMENT"  # an order paid with points (shared.domain.payments)


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


_points = cast(Table, PointBalance.__table__)
_histories = cast(Table, PointHistory.__table__)
# Each statement takes the batch's users as array parameters: compiled once, one round trip.
_CREATE_ZERO = text(
    "INSERT INTO points (user_id, balance) SELECT unnest(CAST(:users AS bigint[])), 0"
    " ORDER BY 1 ON CONFLICT DO NOTHING"
)
_LOCK_BALANCES = (
    select(_points.c.user_id, _points.c.balance)
    .where(_points.c.user_id == any_of("users", BigInteger()))
    .order_by(_points.c.user_id)
    .with_for_update()
)
_ADD_DELTAS = text(
    "UPDATE points SET balance = points.balance + delta.amount, updated_at = now()"
    " FROM unnest(CAST(:users AS bigint[]), CAST(:deltas AS bigint[])) AS delta(user_id, amount)"
    " WHERE points.user_id = ANY(CAST(:users AS bigint[])) AND points.user_id = delta.user_id"
)
# Core, not the ORM's bulk insert: one INSERT .. VALUES for the batch (insertmanyvalues).
_INSERT_HISTORIES = insert(_histories)


class PointBook:
    """The balances of one batch's users: locked once, changed in order in memory, written once.

    Opening the book locks the users' rows ``FOR UPDATE`` (ascending user id), creating
    a zero row first for each user in ``create`` (a charge needs a row to add to), so the
    balances cannot change underneath while the batch decides.  ``write()`` gives each
    row its net delta and inserts one history row per applied change;
    ``ck_points_balance_non_negative`` / ``ck_points_balance_at_most_limit`` refuse on
    their own whatever was decided here.
    """

    def __init__(
        self, session: Session, users: Iterable[int], *, create: Iterable[int] = ()
    ) -> None:
        self._session = session
        created = sorted(set(create))
        if created:
            session.execute(_CREATE_ZERO, {"users": created})
        self._users = sorted(set(users) | set(created))
        locked = session.execute(_LOCK_BALANCES, {"users": self._users})
        self._start: dict[int, int] = dict(locked.all())
        self._balances = dict(self._start)
        self._histories: list[dict[str, object]] = []

    def balance(self, user_id: int) -> int:
        """The user's balance after the changes applied so far (0 for a user never charged)."""
        return self._balances.get(user_id, 0)

    def change(self, r: PointRequest) -> Balance | DomainError:
        """Apply a charge or a use, or refuse it: ``PointLimitExceeded`` (a balance would
        pass 10,000,000), ``InsufficientPoints`` (including a user never charged)."""
        current = self.balance(r.user_id)
        if r.change is PointChange.CHARGE:
            new = current + r.amount
            if new > MAX_BALANCE:
                return PointLimitExceeded(f"a balance may not exceed {MAX_BALANCE:,} points")
        else:
            new = current - r.amount
            if new < 0:
                return InsufficientPoints(f"user {r.user_id} has fewer than {r.amount} points")
        self._record(r.user_id, r.change, r.amount, new, job_id=r.job_id)
        return Balance(r.user_id, new)

    def debit_payment(
        self, user_id: int, amount: int, *, order_id: int, job_id: uuid.UUID | None
    ) -> int:
        """Take an order's payment (the caller checked it is covered); the new balance.

        A PAYMENT history row is written even for 0 points (API.md)."""
        new = self.balance(user_id) - amount
        if new < 0:
            raise ValueError(f"user {user_id}: a payment of {amount} is not covered")
        self._record(user_id, PointChange.PAYMENT, amount, new, job_id=job_id, order_id=order_id)
        return new

    def _record(
        self,
        user_id: int,
        change: PointChange,
        amount: int,
        new: int,
        *,
        job_id: uuid.UUID | None,
        order_id: int | None = None,
    ) -> None:
        if user_id not in self._users:
            raise ValueError(f"user {user_id} is not in this book (their row is not locked)")
        self._balances[user_id] = new
        self._histories.append(
            {
                "user_id": user_id,
                "type": change.value,
                "amount": amount,
                "balance_after": new,
                "job_id": job_id,
                "order_id": order_id,
            }
        )

    def write(self) -> None:
        """Each changed row once (its net delta), then the history rows, in order."""
        changed = [u for u in self._users if self._balances.get(u, 0) != self._start.get(u, 0)]
        if changed:
            self._session.execute(
                _ADD_DELTAS,
                {
                    "users": changed,
                    "deltas": [self._balances[u] - self._start[u] for u in changed],
                },
            )
        if self._histories:
            self._session.execute(_INSERT_HISTORIES, self._histories)


def apply_point_requests(
    session: Session, requests: list[PointRequest]
) -> list[Balance | DomainError]:
    """Apply charges and uses in order; one outcome per request, each a new balance or a refusal.

    Decided against a ``PointBook`` (rows locked ``FOR UPDATE`` once, net deltas written
    once).  Refusals: ``PointLimitExceeded``, ``InsufficientPoints``.
    """
    book = PointBook(
        session,
        (r.user_id for r in requests),
        create=(r.user_id for r in requests if r.change is PointChange.CHARGE),
    )
    outcomes = [book.change(r) for r in requests]
    book.write()
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


def point_histories_query(user_id: int, *, page: int, size: int) -> Select[PointHistory]:
    """One page of the user's point changes, newest (highest id) first.

    ``point_histories`` is partitioned by month of ``created_at`` and a user's rows
    have no bound in time: each partition's ``(user_id, id)`` index is read backwards
    and merged (MergeAppend), stopping once the page is full."""
    return (
        select(PointHistory)
        .where(PointHistory.user_id == user_id)
        .order_by(PointHistory.id.desc())
        .offset((page - 1) * size)
        .limit(size)
    )


def list_point_histories(
    session: Session, user_id: int, *, page: int, size: int
) -> tuple[list[PointHistory], int]:
    """One page of the user's point changes, newest first, and the total count."""
    total = session.execute(
        select(func.count()).select_from(PointHistory).where(PointHistory.user_id == user_id)
    ).scalar_one()
    rows = session.execute(point_histories_query(user_id, page=page, size=size)).scalars()
    return list(rows), int(total)
