"""The Redis transport for Celery messages, and wake-ups sent in one round trip.

kombu's Redis channel builds a new ``redis.Redis`` client for every message it
publishes (``Channel.conn_or_acquire`` -> ``_create_client``), and redis-py fills
a table of ~165 response callbacks for each new client: ~0.5 ms of CPU per
wake-up, on the job POST's path.  This channel builds that client once and
reuses it; it shares the channel's connection pool, as the throw-away ones did,
so behaviour is otherwise kombu's own.  Selected with Celery's
``broker_transport = "shared.broker:Transport"`` beside a ``redis://`` URL.
"""

from __future__ import annotations

import contextvars
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    @cached_property
    def _publishing_client(self) -> Any:
        return self._create_client()  # type: ignore[attr-defined]  # not in celery-types' stubs

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        yield client or self._publishing_client

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        captured = _capturing.get()
        if captured is not None:
            priority = self._get_message_priority(message, reverse=False)
            captured.append((self._q_for_pri(queue, priority), message))  # type: ignore[attr-defined]
            return
        super()._put(queue, message, **kwargs)


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"


# ---- wake-ups in one round trip ------------------------------------------------------

_capturing: contextvars.ContextVar[list[tuple[str, dict[str, Any]]] | None] = (
    contextvars.ContextVar("capturing", default=None)
)


@contextmanager
def capture_messages() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Messages published in the block are collected as ``(queue, message)``, not sent."""
    captured: list[tuple[str, dict[str, Any]]] = []
    token = _capturing.set(captured)
    try:
        yield captured
    finally:
        _capturing.reset(token)


# SET the wake flag if absent and, only then, push the message onto the queue: ARGV =
# flag seconds, message.  Both keys live in the broker's database.
_WAKE = """
if redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

_ID = "00000000-0000-4000-8000-00000000c0de"
_TAG = "00000000-0000-4000-8000-0000000007a9"


class WakeUpTemplates:
    """Wake-up messages made by the real Celery publish path once per queue, then sent with
    fresh ids by one Lua call that also sets the wake flag: one Redis round trip per
    wake-up instead of a SET NX plus Celery's and kombu's publish (~0.5 ms of CPU: message
    building, a binding-table read, the push).  The message is exactly what kombu would
    push (captured from it at run time, so it follows the installed versions); only the
    task id and the delivery tag are new for each message.
    """

    def __init__(self, client: redis.Redis, publish: Callable[[str], None]) -> None:
        self._client = client
        self._publish = publish  # sends a wake-up of a queue through Celery
        self._templates: dict[str, tuple[str, str]] = {}

    def _template(self, queue: str) -> tuple[str, str]:
        template = self._templates.get(queue)
        if template is None:
            with capture_messages() as captured:
                self._publish(queue)
            ((key, message),) = captured
            if message["properties"].get("priority"):
                raise RuntimeError("wake-ups are sent without priority")
            headers, properties = message["headers"], message["properties"]
            ids = {headers["id"], properties["delivery_tag"]}
            headers["id"] = properties["correlation_id"] = _ID
            if headers.get("root_id") in ids:
                headers["root_id"] = _ID
            properties["delivery_tag"] = _TAG
            template = self._templates[queue] = (key, json.dumps(message))
        return template

    def wake(self, flag: str, queue: str, flag_seconds: int) -> bool:
        """Set ``flag`` and push a wake-up onto ``queue``, unless the flag is already set."""
        return self.wake_many([(flag, queue)], flag_seconds)[0]

    def wake_many(self, wake_ups: list[tuple[str, str]], flag_seconds: int) -> list[bool]:
        """``wake`` each ``(flag, queue)``, all in one pipeline; True for those sent."""
        pipe = self._client.pipeline(transaction=False)
        for flag, queue in wake_ups:
            key, template = self._template(queue)
            message = template.replace(_ID, str(uuid.uuid4())).replace(_TAG, str(uuid.uuid4()))
            # EVAL, not a registered Script: on a pipeline, redis-py asks SCRIPT EXISTS
            # before every execute (a round trip more); Redis caches the compiled body.
            pipe.eval(_WAKE, 2, flag, key, flag_seconds, message)
        return [bool(sent) for sent in pipe.execute()]
