"""Group commit of job rows: the requests that arrive while one INSERT is in flight
share the next one.

Every job POST must have its row committed before it answers 202 (API.md), and a
commit is a WAL flush: alone, each job pays a round trip, a statement and a flush
of its own.  Here the first request to find no write in flight writes at once (no
added wait: at low load a job is written alone); requests arriving meanwhile queue
up, and when the write returns, the first of them writes all of them in one
statement.  Each request still answers only once its own row is committed, so the
202 promise is unchanged; under load the cost of a commit is shared.

The writes run in request greenlets (gevent): the writer of a batch is one of its
requests, which hands the next batch to the first request waiting, so no request
writes more than one batch and no background thread is involved (and the Flask
test client, one request at a time, simply writes each row alone).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Entry(Generic[T, R]):
    item: T
    done: threading.Event = field(default_factory=threading.Event)
    result: R | None = None
    error: BaseException | None = None
    writes_next: bool = False

    def outcome(self) -> R:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class GroupCommit(Generic[T, R]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[_Entry[T, R]] = []
        self._writing = False

    def submit(self, item: T, write: Callable[[list[T]], list[R]]) -> R:
        """``write(items)`` the queued items with ``item`` (one result per item, in order);
        returns ``item``'s result, or raises what the write raised."""
        entry: _Entry[T, R] = _Entry(item)
        with self._lock:
            self._waiting.append(entry)
            writer = not self._writing
            self._writing = True
        if not writer:
            entry.done.wait()
            if not entry.writes_next:
                return entry.outcome()
        with self._lock:
            batch, self._waiting = self._waiting, []
        try:
            for queued, result in zip(batch, write([e.item for e in batch]), strict=True):
                queued.result = result
        except BaseException as exc:
            for queued in batch:
                queued.error = exc
        finally:
            with self._lock:
                following = self._waiting[0] if self._waiting else None
                if following is not None:
                    following.writes_next = True
                else:
                    self._writing = False
            for queued in batch:
                if queued is not entry:
                    queued.done.set()
            if following is not None:
                following.done.set()
        return entry.outcome()
