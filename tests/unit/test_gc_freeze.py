"""A partition worker freezes what it built to start, once it is ready (workers.make_celery):
a full collection then walks only what was made since."""

from __future__ import annotations

import gc

import pytest
from celery import signals

from shared.config import Settings
from workers import make_celery


def test_a_ready_worker_freezes_its_start_up_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen: list[bool] = []
    make_celery(Settings(database_url="postgresql://unused/unused", redis_url="redis://unused"))
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    assert frozen == []
    signals.worker_ready.send(sender=object())
    assert frozen
