"""Wire formats shared by web responses and job results."""

from __future__ import annotations

import datetime as dt


def rfc3339(moment: dt.datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a ``Z``: ``2026-11-30T04:15:35.123Z``."""
    utc = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="milliseconds") + "Z"
