"""Group commit (web/recording.py): concurrent submissions share writes, each gets its own
result or its batch's error, every item is written exactly once, and no submitter writes
more than one batch."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from web.recording import GroupCommit

SUBMITTERS = 64


def test_items_queued_behind_a_write_share_the_next_one() -> None:
    group: GroupCommit[int, str] = GroupCommit()
    batches: list[list[int]] = []
    writers: list[str] = []
    first_write_may_end = threading.Event()
    lock = threading.Lock()

    def write(items: list[int]) -> list[str]:
        with lock:
            batches.append(list(items))
            writers.append(threading.current_thread().name)
        if len(batches) == 1:
            assert first_write_may_end.wait(10)
        return [f"row {i}" for i in items]

    def submit(i: int) -> str:
        return group.submit(i, write)

    with ThreadPoolExecutor(max_workers=SUBMITTERS) as pool:
        first = pool.submit(submit, 0)
        deadline = time.monotonic() + 10
        while not batches and time.monotonic() < deadline:
            time.sleep(0.001)
        rest = [pool.submit(submit, i) for i in range(1, SUBMITTERS)]
        # Everyone else queues behind the write in flight (poll the queue, no fixed sleep).
        while len(group._waiting) < SUBMITTERS - 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        first_write_may_end.set()
        results = [first.result(10)] + [f.result(10) for f in rest]

    assert results == [f"row {i}" for i in range(SUBMITTERS)]
    assert batches[0] == [0]
    assert sorted(i for batch in batches for i in batch) == list(range(SUBMITTERS))
    assert len(batches) == 2  # the 63 that queued were written together
    assert len(set(writers)) == len(writers)  # no submitter wrote two batches


def test_a_failed_write_fails_its_batch_only() -> None:
    group: GroupCommit[int, int] = GroupCommit()
    calls = 0

    def write(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database away")
        return items

    with pytest.raises(ConnectionError):
        group.submit(1, write)
    assert group.submit(2, write) == 2  # the group is usable again
    assert calls == 2


def test_many_rounds_of_concurrent_submissions_each_get_their_own_result() -> None:
    group: GroupCommit[int, int] = GroupCommit()
    written: list[int] = []
    lock = threading.Lock()

    def write(items: list[int]) -> list[int]:
        time.sleep(0.0005)  # a round trip's worth: later submitters queue meanwhile
        with lock:
            written.extend(items)
        return [i * 10 for i in items]

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda i: group.submit(i, write), range(2000)))
    assert results == [i * 10 for i in range(2000)]
    assert sorted(written) == list(range(2000))
