"""Celery entry point: ``celery -A workers.app ...``."""

from workers import make_celery

app = make_celery()
