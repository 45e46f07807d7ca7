"""The drain path (workers/base.py) and each family's handler, on the real database and Redis.

Jobs are recorded with ``shared.jobs.record`` and committed (a savepoint of the test's
outer transaction), then applied by ``apply_next_batch`` / ``drain_partition`` exactly as
the partition consumer does; no broker is involved (the runtime records its sends).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, delete, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

# Importing the family modules registers their handlers in HANDLERS.
import workers.coupons
import workers.orders
import workers.points
import workers.products
from shared.config import Settings
from shared.domain.coupons import create_coupon
from shared.domain.errors import ErrorCode
from shared.domain.inventory import LineRequest, create_order
from shared.domain.orders import list_order_histories
from shared.domain.points import get_balance
from shared.domain.products import create_product, get_product, product_document
from shared.jobs import (
    FINISHED_CHANNEL_PREFIX,
    JobKind,
    JobRecord,
    JobStatus,
    NewJob,
    document_of,
    get_job,
    has_unheld_pending,
    lock_partition,
    lock_pending_batch,
    record,
    record_many,
    waiters_key,
    wake_key,
)
from shared.models import Job, PointHistory, Product, UserCoupon
from shared.partitions import HISTORY_QUEUE, PartitionKind, kind_queues, partition
from workers.base import (
    HANDLERS,
    Effects,
    RetryLater,
    Runtime,
    apply_next_batch,
    drain_partition,
    has_pending,
    is_transient,
)
from workers.base import Outcome as BatchOutcome
from workers.history import drain_outbox


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    attempts: int
    finished_at: object

    @property
    def code(self) -> str | None:
        return None if self.error is None else self.error["code"]


@pytest.fixture(autouse=True)
def _no_foreign_pending_jobs(session_factory: sessionmaker[Session]) -> None:
    """Jobs another suite left PENDING on this database are no concern here (rolled back)."""
    with session_factory() as session, session.begin():
        session.execute(
            update(Job).where(Job.status == JobStatus.PENDING.value).values(status="FAILED")
        )


def _submit(
    rt: Runtime, kind: JobKind, *, reply_to: str | None = None, **payload: Any
) -> tuple[uuid.UUID, str]:
    with rt.session_factory() as session, session.begin():
        job = record(
            session,
            kind=kind,
            payload=payload,
            partitions=rt.settings.partitions,
            reply_to=reply_to,
        ).job
        return job.id, job.partition


def _outcome(rt: Runtime, job_id: uuid.UUID) -> Outcome:
    with rt.session_factory() as session:
        job = session.get_one(Job, job_id)
        return Outcome(job.status, job.result, job.error, job.attempts, job.finished_at)


def _product(rt: Runtime, *, price: int = 100, stock: int = 10) -> int:
    with rt.session_factory() as session, session.begin():
        return create_product(session, name="Thing", price=price, stock=stock).id


def _coupon(rt: Runtime, total: int) -> int:
    with rt.session_factory() as session, session.begin():
        return create_coupon(session, name="C", discount_amount=100, total_quantity=total).id


def _stock(rt: Runtime, product_id: int) -> int:
    with rt.session_factory() as session:
        return get_product(session, product_id).stock


def _balance(rt: Runtime, user_id: int) -> int:
    with rt.session_factory() as session:
        return get_balance(session, user_id).amount


def _user() -> int:
    return uuid.uuid4().int % 10**15 + 1


# ---- results and codes per job kind ------------------------------------------------


def test_points_jobs_give_the_new_balance_or_their_code(runtime: Runtime) -> None:
    user = _user()
    charge, queue = _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=500)
    use, _ = _submit(runtime, JobKind.POINTS_USE, userId=user, amount=200)
    overdraw, _ = _submit(runtime, JobKind.POINTS_USE, userId=user, amount=301)
    over_limit, _ = _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=9_999_701)
    to_limit, _ = _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=9_999_700)

    assert drain_partition(runtime, queue) == 5

    assert _outcome(runtime, charge).result == {"userId": user, "amount": 500}
    assert _outcome(runtime, use).result == {"userId": user, "amount": 300}
    assert _outcome(runtime, overdraw).code == ErrorCode.INSUFFICIENT_POINTS
    assert _outcome(runtime, over_limit).code == ErrorCode.POINT_LIMIT_EXCEEDED
    assert _outcome(runtime, to_limit).result == {"userId": user, "amount": 10_000_000}
    for job_id in (charge, use, to_limit):
        done = _outcome(runtime, job_id)
        assert (done.status, done.error) == (JobStatus.SUCCEEDED, None)
        assert done.finished_at is not None
    for job_id in (overdraw, over_limit):
        failed = _outcome(runtime, job_id)
        assert (failed.status, failed.result) == (JobStatus.FAILED, None)
        assert failed.error is not None
        assert failed.error["message"]
    assert _balance(runtime, user) == 10_000_000
    with runtime.session_factory() as session:
        histories = session.execute(
            select(PointHistory.job_id).where(PointHistory.user_id == user)
        ).scalars()
        assert set(histories) == {charge, use, to_limit}  # none for the failed ones


def test_stock_set_gives_the_product_and_refreshes_the_cache(runtime: Runtime) -> None:
    product_id = _product(runtime, stock=10)
    runtime.cache.get_product(product_id)  # nothing cached yet, and no error
    generation = runtime.cache.listing_generation()
    assert generation is not None
    job_id, queue = _submit(runtime, JobKind.STOCK_SET, productId=product_id, stock=3)
    missing, missing_queue = _submit(runtime, JobKind.STOCK_SET, productId=2**63 - 1, stock=3)

    drain_partition(runtime, queue)
    drain_partition(runtime, missing_queue)

    with runtime.session_factory() as session:
        document = product_document(get_product(session, product_id))
    assert document["stock"] == 3
    assert _outcome(runtime, job_id).result == document
    assert runtime.cache.get_product(product_id) == document
    after = runtime.cache.listing_generation()
    assert after is not None
    assert after > generation
    failed = _outcome(runtime, missing)
    assert (failed.status, failed.code) == (JobStatus.FAILED, ErrorCode.PRODUCT_NOT_FOUND)


def test_order_create_gives_the_order_and_feeds_history(runtime: Runtime) -> None:
    cheap = _product(runtime, price=100, stock=5)
    dear = _product(runtime, price=700, stock=2)
    runtime.broker.delete(wake_key(HISTORY_QUEUE))
    lines = [{"productId": dear, "quantity": 2}, {"productId": cheap, "quantity": 1}]
    job_id, queue = _submit(runtime, JobKind.ORDER_CREATE, userId=9, orderLines=lines)

    assert drain_partition(runtime, queue) == 1

    done = _outcome(runtime, job_id)
    assert done.status == JobStatus.SUCCEEDED
    assert done.result is not None
    assert set(done.result) == {"orderId", "status"}
    assert done.result["status"] == "READY"
    assert isinstance(done.result["orderId"], int)
    assert (_stock(runtime, cheap), _stock(runtime, dear)) == (4, 0)
    for product_id, stock in ((cheap, 4), (dear, 0)):
        cached = runtime.cache.get_product(product_id)
        assert cached is not None
        assert cached["stock"] == stock
    assert HISTORY_QUEUE in runtime.sent  # type: ignore[attr-defined]

    assert drain_outbox(runtime) >= 1
    with runtime.session_factory() as session:
        states = [h.status for h in list_order_histories(session, done.result["orderId"])]
    assert states == ["READY"]


def test_order_create_codes_and_all_or_nothing(runtime: Runtime) -> None:
    plenty = _product(runtime, stock=10)
    short = _product(runtime, stock=1)
    partial, queue = _submit(
        runtime,
        JobKind.ORDER_CREATE,
        userId=1,
        orderLines=[{"productId": plenty, "quantity": 3}, {"productId": short, "quantity": 2}],
    )
    unknown, _ = _submit(
        runtime,
        JobKind.ORDER_CREATE,
        userId=1,
        orderLines=[{"productId": plenty, "quantity": 1}, {"productId": 2**63 - 1, "quantity": 1}],
    )
    unknown_and_short, _ = _submit(
        runtime,
        JobKind.ORDER_CREATE,
        userId=1,
        orderLines=[{"productId": plenty, "quantity": 99}, {"productId": 2**63 - 1, "quantity": 1}],
    )
    # All three route to the partition of their smallest product id, ``plenty``.
    assert drain_partition(runtime, queue) == 3
    assert _outcome(runtime, partial).code == ErrorCode.INSUFFICIENT_STOCK
    assert _outcome(runtime, unknown).code == ErrorCode.PRODUCT_NOT_FOUND
    assert _outcome(runtime, unknown_and_short).code == ErrorCode.PRODUCT_NOT_FOUND
    assert (_stock(runtime, plenty), _stock(runtime, short)) == (10, 1)


def test_coupon_issue_gives_the_user_coupon_or_its_code(runtime: Runtime) -> None:
    coupon = _coupon(runtime, total=5)
    first, queue = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=11)
    again, _ = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=11)
    missing, missing_queue = _submit(runtime, JobKind.COUPON_ISSUE, couponId=2**63 - 1, userId=11)

    drain_partition(runtime, queue)
    drain_partition(runtime, missing_queue)

    result = _outcome(runtime, first).result
    assert result is not None
    assert set(result) == {"couponId", "userId", "userCouponId"}
    assert (result["couponId"], result["userId"]) == (coupon, 11)
    assert isinstance(result["userCouponId"], int)
    assert _outcome(runtime, again).code == ErrorCode.COUPON_ALREADY_ISSUED
    assert _outcome(runtime, missing).code == ErrorCode.COUPON_NOT_FOUND


def test_order_pay_in_a_user_batch_with_charges_gives_the_payment_or_its_code(
    runtime: Runtime,
) -> None:
    product = _product(runtime, price=300, stock=5)
    user = _user()
    with runtime.session_factory() as session, session.begin():
        order_id = create_order(session, user, [LineRequest(product, 1)]).id
    runtime.coordination.delete(wake_key(HISTORY_QUEUE))
    early, queue = _submit(runtime, JobKind.ORDER_PAY, userId=user, orderId=order_id)
    charge, charge_queue = _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=500)
    paid, _ = _submit(runtime, JobKind.ORDER_PAY, userId=user, orderId=order_id)
    again, _ = _submit(runtime, JobKind.ORDER_PAY, userId=user, orderId=order_id, couponId=1)
    missing, _ = _submit(runtime, JobKind.ORDER_PAY, userId=user, orderId=2**63 - 1)
    assert charge_queue == queue  # the paying user's partition

    assert drain_partition(runtime, queue) == 5  # one batch, decided in seq order

    assert _outcome(runtime, early).code == ErrorCode.INSUFFICIENT_POINTS
    assert _outcome(runtime, charge).result == {"userId": user, "amount": 500}
    assert _outcome(runtime, paid).result == {
        "orderId": order_id,
        "status": "COMPLETED",
        "paidAmount": 300,
        "discountAmount": 0,
        "balance": 200,
    }
    assert _outcome(runtime, again).code == ErrorCode.ORDER_NOT_PAYABLE
    assert _outcome(runtime, missing).code == ErrorCode.ORDER_NOT_FOUND
    assert _balance(runtime, user) == 200
    assert HISTORY_QUEUE in runtime.sent  # type: ignore[attr-defined]
    drain_outbox(runtime)
    with runtime.session_factory() as session:
        states = [h.status for h in list_order_histories(session, order_id)]
        debits = session.execute(
            select(PointHistory.job_id).where(PointHistory.order_id == order_id)
        ).scalars()
        assert list(debits) == [paid]
    assert states == ["READY", "COMPLETED"]


# ---- the drain path ------------------------------------------------------------------


def test_a_batch_applies_in_commit_order_and_tells_only_the_waiting_processes(
    runtime: Runtime,
) -> None:
    product_id = _product(runtime, stock=0)
    accepted_by, polled_by = f"{FINISHED_CHANNEL_PREFIX}a", f"{FINISHED_CHANNEL_PREFIX}b"
    pubsub = runtime.broker.pubsub()
    pubsub.subscribe(accepted_by, polled_by)
    try:
        for _ in range(2):  # subscribed before anything is published
            confirmed = pubsub.get_message(timeout=10)
            assert confirmed is not None
            assert confirmed["type"] == "subscribe"
        submitted = [
            _submit(
                runtime,
                JobKind.STOCK_SET,
                reply_to=accepted_by if n < 3 else None,
                productId=product_id,
                stock=stock,
            )
            for n, stock in enumerate((5, 9, 2, 7, 4))
        ]
        # The fourth is long-polled by the other process; nobody waits for the fifth.
        runtime.broker.sadd(waiters_key(str(submitted[3][0])), polled_by)
        queue = submitted[0][1]
        assert apply_next_batch(runtime, [queue]) == 5
        results = [_outcome(runtime, job_id).result for job_id, _ in submitted]
        assert [r["stock"] for r in results if r is not None] == [5, 9, 2, 7, 4]
        assert _stock(runtime, product_id) == 4
        told: dict[str, dict[str, Any]] = {}
        for _ in range(2):
            message = pubsub.get_message(timeout=10)
            assert message is not None
            told[message["channel"].decode()] = json.loads(message["data"])
        assert pubsub.get_message(timeout=0.5) is None  # one message per channel, no more
        # The status document of each job, in commit order, exactly as GET answers it,
        # to the processes that wait for it and to no other.
        assert list(told[accepted_by]) == [str(job_id) for job_id, _ in submitted[:3]]
        assert list(told[polled_by]) == [str(submitted[3][0])]
        with runtime.session_factory() as session:
            for channel, documents in told.items():
                for job_id, document in documents.items():
                    row = get_job(session, uuid.UUID(job_id))
                    assert row is not None, channel
                    assert document == document_of(row)
    finally:
        pubsub.close()


def test_drain_takes_batch_after_batch(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    rt = Runtime(dataclasses.replace(settings, batch_size=2), lambda _queue: None)
    rt.use_session_factory(session_factory)
    user = _user()
    jobs = [_submit(rt, JobKind.POINTS_CHARGE, userId=user, amount=n) for n in (1, 2, 3, 4, 5)]
    queue = jobs[0][1]
    assert apply_next_batch(rt, [queue]) == 2
    assert [_outcome(rt, j).status for j, _ in jobs] == ["SUCCEEDED"] * 2 + ["PENDING"] * 3
    assert drain_partition(rt, queue) == 3
    assert [_outcome(rt, j).result for j, _ in jobs] == [
        {"userId": user, "amount": total} for total in (1, 3, 6, 10, 15)
    ]


def test_draining_again_changes_nothing(runtime: Runtime) -> None:
    user = _user()
    first, queue = _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=40)
    second, _ = _submit(runtime, JobKind.POINTS_USE, userId=user, amount=50)
    assert drain_partition(runtime, queue) == 2
    before = [_outcome(runtime, first), _outcome(runtime, second)]

    # A redelivered or swept wake-up.
    assert drain_partition(runtime, queue) == 0
    assert apply_next_batch(runtime, [queue]) == 0

    assert [_outcome(runtime, first), _outcome(runtime, second)] == before
    assert before[1].code == ErrorCode.INSUFFICIENT_POINTS
    assert _balance(runtime, user) == 40


POISON = 13


@pytest.fixture
def poisoned_charge(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch holding a POINTS_CHARGE of ``POISON`` points applies its changes, then fails."""
    original = HANDLERS[PartitionKind.USER]

    def poisoned(
        rt: Runtime, session: Session, jobs: list[JobRecord], effects: Effects
    ) -> list[BatchOutcome]:
        outcomes = original(rt, session, jobs, effects)
        if any(job.payload["amount"] == POISON for job in jobs):
            raise RuntimeError("poison message")
        return outcomes

    monkeypatch.setitem(HANDLERS, PartitionKind.USER, poisoned)


@pytest.mark.usefixtures("poisoned_charge")
def test_a_poison_job_fails_internal_alone_after_its_attempts(runtime: Runtime) -> None:
    user = _user()
    before, queue = _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=100)
    poison, _ = _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=POISON)
    after, _ = _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=50)
    max_attempts = runtime.settings.job_max_attempts
    assert max_attempts > 1

    retries = 0
    for _ in range(max_attempts + 1):
        try:
            drain_partition(runtime, queue)
        except RetryLater:
            retries += 1
            # The jobs behind the poison wait for it: order is kept.
            assert _outcome(runtime, poison).status == JobStatus.PENDING
            assert _outcome(runtime, poison).attempts == retries
            assert _outcome(runtime, after).status == JobStatus.PENDING
        else:
            break
    assert retries == max_attempts - 1

    failed = _outcome(runtime, poison)
    assert (failed.status, failed.code, failed.attempts) == (
        JobStatus.FAILED,
        ErrorCode.INTERNAL,
        max_attempts,
    )
    assert _outcome(runtime, before).result == {"userId": user, "amount": 100}
    assert _outcome(runtime, after).result == {"userId": user, "amount": 150}
    assert _balance(runtime, user) == 150  # nothing of the poison job applied
    assert drain_partition(runtime, queue) == 0


@pytest.fixture
def partition_held_elsewhere(engine: Engine) -> Iterator[Any]:
    """Another connection that can hold a partition's advisory lock until the test ends."""
    connection = engine.connect()
    transaction = connection.begin()
    with Session(bind=connection) as other:
        yield lambda queue: lock_partition(other, queue)
    transaction.rollback()
    connection.close()


def test_a_partition_another_drainer_holds_is_skipped_not_waited_for(
    runtime: Runtime, partition_held_elsewhere: Any
) -> None:
    user = _user()
    job_id, queue = _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=5)
    partition_held_elsewhere(queue)

    assert apply_next_batch(runtime, [queue]) == 0
    # Its holder looks again after its own commit: this drain need not.
    assert not has_pending(runtime, [queue])
    waiting = _outcome(runtime, job_id)
    assert (waiting.status, waiting.attempts) == (JobStatus.PENDING, 0)
    assert _balance(runtime, user) == 0


def _users_of_distinct_partitions(rt: Runtime, count: int) -> list[int]:
    users: dict[str, int] = {}
    while len(users) < count:
        user = _user()
        users.setdefault(partition(PartitionKind.USER, user, rt.settings.partitions), user)
    return list(users.values())


def test_a_batch_takes_every_partition_of_its_kind_each_in_commit_order(
    runtime: Runtime,
) -> None:
    first, second = _users_of_distinct_partitions(runtime, 2)
    jobs = [
        _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=amount)
        for user, amount in ((first, 10), (second, 1), (first, 20), (second, 2), (first, 30))
    ]
    # Woken for one partition, the drain applies both, in one batch.
    assert apply_next_batch(runtime, kind_queues(PartitionKind.USER, 16)) == 5
    assert [_outcome(runtime, job_id).result for job_id, _ in jobs] == [
        {"userId": first, "amount": 10},
        {"userId": second, "amount": 1},
        {"userId": first, "amount": 30},
        {"userId": second, "amount": 3},
        {"userId": first, "amount": 60},
    ]


def test_a_batch_locks_only_the_partitions_it_has_room_for(engine: Engine) -> None:
    """Two drainers of one kind at once, on their own connections and committed rows:
    the first locks the oldest partitions up to its batch size, the second takes the
    next ones instead of waiting, and neither ever takes part of the other's."""
    committed = sessionmaker(engine)
    kind = f"drill{uuid.uuid4().hex[:8]}"  # a kind of its own: no other rows there
    queues = [f"{kind}.{n}" for n in range(3)]
    jobs = [
        NewJob(uuid.uuid4(), JobKind.POINTS_CHARGE, queue, {"userId": 1, "amount": amount})
        for queue in queues
        for amount in (1, 2)
    ]
    with committed() as session, session.begin():
        record_many(session, jobs)
    try:
        with contextlib.ExitStack() as drainers:
            batches = []
            for _ in range(3):
                session = drainers.enter_context(committed())
                drainers.enter_context(session.begin())
                with engine.connect() as onlooker:  # a drain's look after its commit
                    assert has_unheld_pending(onlooker, queues)
                batches.append([j.id for j in lock_pending_batch(session, queues, 2)])
            # All three are held now: a fourth drainer finds nothing it may take, and a
            # look finds nothing left that their holders will not look at again.
            with committed() as fourth, fourth.begin():
                assert lock_pending_batch(fourth, queues, 2) == []
            with engine.connect() as onlooker:
                assert not has_unheld_pending(onlooker, queues)
        assert batches == [[j.id for j in jobs[n : n + 2]] for n in (0, 2, 4)]
    finally:
        with committed() as session, session.begin():
            session.execute(delete(Job).where(Job.partition.in_(queues)))


@pytest.fixture
def row_locked_elsewhere(engine: Engine) -> Iterator[int]:
    """A committed product whose row another transaction holds ``FOR UPDATE``."""
    with Session(bind=engine) as setup, setup.begin():
        product_id = create_product(setup, name="locked elsewhere", price=1, stock=1).id
    connection = engine.connect()
    transaction = connection.begin()
    connection.execute(select(Product.id).where(Product.id == product_id).with_for_update())
    yield product_id
    transaction.rollback()
    connection.close()
    with Session(bind=engine) as cleanup, cleanup.begin():
        cleanup.execute(delete(Product).where(Product.id == product_id))


def test_a_database_error_inside_a_handler_propagates_and_is_not_an_attempt(
    runtime: Runtime, row_locked_elsewhere: int
) -> None:
    job_id, queue = _submit(runtime, JobKind.STOCK_SET, productId=row_locked_elsewhere, stock=9)
    with runtime.session_factory() as session, session.begin():
        session.execute(text("SET LOCAL lock_timeout = '50ms'"))

    with pytest.raises(OperationalError):
        drain_partition(runtime, queue)

    waiting = _outcome(runtime, job_id)
    assert (waiting.status, waiting.attempts) == (JobStatus.PENDING, 0)


def test_transient_errors_are_told_apart() -> None:
    assert is_transient(OperationalError("SELECT 1", {}, Exception("server closed")))
    assert not is_transient(RuntimeError("bug"))
    assert not is_transient(ValueError("bad payload"))


# ---- the coupon sold-out fast path (workers/coupons.py) ---------------------------------


def _marker(rt: Runtime, coupon_id: int) -> tuple[bool, set[int]]:
    sold_out = bool(rt.coordination.exists(workers.coupons.sold_out_key(coupon_id)))
    holders = rt.coordination.smembers(workers.coupons.holders_key(coupon_id))
    return sold_out, {int(h) for h in holders}  # type: ignore[union-attr]


def test_no_marker_while_coupons_remain(runtime: Runtime) -> None:
    coupon = _coupon(runtime, total=3)
    job_id, queue = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=1)
    drain_partition(runtime, queue)
    assert _outcome(runtime, job_id).status == JobStatus.SUCCEEDED
    assert _marker(runtime, coupon) == (False, set())


def test_sell_out_leaves_a_marker_and_settles_later_issues_from_it(runtime: Runtime) -> None:
    coupon = _coupon(runtime, total=2)
    first, queue = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=101)
    second, _ = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=102)
    drain_partition(runtime, queue)
    assert _outcome(runtime, first).status == JobStatus.SUCCEEDED
    assert _outcome(runtime, second).status == JobStatus.SUCCEEDED
    assert _marker(runtime, coupon) == (True, {101, 102})

    # Redis is trusted once the marker is there: a holder only Redis knows of proves it.
    runtime.coordination.sadd(workers.coupons.holders_key(coupon), "109")
    holder, _ = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=101)
    redis_only_holder, _ = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=109)
    latecomer, _ = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=103)
    assert drain_partition(runtime, queue) == 3
    assert _outcome(runtime, holder).code == ErrorCode.COUPON_ALREADY_ISSUED
    assert _outcome(runtime, redis_only_holder).code == ErrorCode.COUPON_ALREADY_ISSUED
    assert _outcome(runtime, latecomer).code == ErrorCode.COUPON_SOLD_OUT


def test_a_lost_marker_is_rebuilt_from_the_database(runtime: Runtime) -> None:
    coupon = _coupon(runtime, total=1)
    _first, queue = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=201)
    drain_partition(runtime, queue)
    assert _marker(runtime, coupon) == (True, {201})
    runtime.coordination.delete(
        workers.coupons.sold_out_key(coupon), workers.coupons.holders_key(coupon)
    )

    holder, _ = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=201)
    latecomer, _ = _submit(runtime, JobKind.COUPON_ISSUE, couponId=coupon, userId=202)
    drain_partition(runtime, queue)
    assert _outcome(runtime, holder).code == ErrorCode.COUPON_ALREADY_ISSUED
    assert _outcome(runtime, latecomer).code == ErrorCode.COUPON_SOLD_OUT
    assert _marker(runtime, coupon) == (True, {201})


def test_without_redis_coupons_are_still_issued_exactly(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    from shared.embedded import free_port

    dead = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    rt = Runtime(dead, lambda _queue: None)
    rt.use_session_factory(session_factory)
    with pytest.raises(redis.ConnectionError):
        rt.coordination.ping()

    coupon = _coupon(rt, total=1)
    first, queue = _submit(rt, JobKind.COUPON_ISSUE, couponId=coupon, userId=301)
    again, _ = _submit(rt, JobKind.COUPON_ISSUE, couponId=coupon, userId=301)
    other, _ = _submit(rt, JobKind.COUPON_ISSUE, couponId=coupon, userId=302)
    assert drain_partition(rt, queue) == 3
    assert _outcome(rt, first).status == JobStatus.SUCCEEDED
    assert _outcome(rt, again).code == ErrorCode.COUPON_ALREADY_ISSUED
    assert _outcome(rt, other).code == ErrorCode.COUPON_SOLD_OUT
    with rt.session_factory() as session:
        issued = session.execute(
            select(func.count()).select_from(UserCoupon).where(UserCoupon.coupon_id == coupon)
        ).scalar_one()
    assert issued == 1
