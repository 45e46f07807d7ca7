"""What an operator sees: pages rendered by a real headless Chromium (Debian's package).

``make test`` installs Chromium when it is missing (``make browser``); run alone
without it, these tests fail and say so rather than skip.  The browser may reach
loopback only (``--host-resolver-rules``): a page that needs the internet (a CDN)
renders as it would on a machine without one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

WINDOW = "1400,900"
_FLAGS = [
    "--headless",
    "--no-sandbox",  # as root, Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: `make browser` installs Debian's package")
    return path


def _run(args: list[str], tmp: Path, timeout: float) -> subprocess.CompletedProcess[bytes]:
    profile = tmp / "chromium-profile"
    return subprocess.run(
        [chromium(), *_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        timeout=timeout,
        check=True,
    )


def dump_dom(url: str, tmp: Path, *, budget_ms: int = 8000, timeout: float = 90) -> str:
    """The DOM after the page's scripts ran (virtual time ``budget_ms``), as HTML."""
    answer = _run(
        [f"--virtual-time-budget={budget_ms}", f"--window-size={WINDOW}", "--dump-dom", url],
        tmp,
        timeout,
    )
    return answer.stdout.decode(errors="replace")


def screenshot(
    url: str,
    path: Path,
    tmp: Path,
    *,
    size: str = WINDOW,
    budget_ms: int = 8000,
    timeout: float = 90,
) -> Path:
    """A PNG of the page as rendered at ``size`` (width,height)."""
    _run(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size}",
            f"--screenshot={path}",
            url,
        ],
        tmp,
        timeout,
    )
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path
