"""Circuit breakers that fail fast without serializing the calls they guard.

``pybreaker.CircuitBreaker.call`` holds the breaker's lock for the whole wrapped
call (danielfm/pybreaker#3; the PRs that fix it were never merged), so every
INSERT + COMMIT of a web process would queue behind one lock.  ``Breaker`` keeps
pybreaker's states, counters and listeners, but while the circuit is closed it
runs the call outside the lock and takes the lock only to record the result.
Open and half-open calls keep pybreaker's own path: a refusal, or the one trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pybreaker

T = TypeVar("T")


class Breaker(pybreaker.CircuitBreaker):
    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._lock:
            closed = self.current_state == pybreaker.STATE_CLOSED
        if not closed:
            result: T = super().call(func, *args, **kwargs)
            return result
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            with self._lock:
                # Counts the failure (unless excluded), may open the circuit, re-raises.
                self.state._handle_error(exc)
            raise
        with self._lock:
            self.state._handle_success()
        return result
