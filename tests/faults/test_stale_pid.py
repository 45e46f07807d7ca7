"""A pid file left by SIGKILL or a power loss: what the pid is now decides, not whether it lives.

After a crash the kernel may hand the number in ``postmaster.pid`` to any other
process; PostgreSQL then refuses to start ("is another postmaster running?")
unless the launcher removes the stale file.  It removes it unless the pid is a
``postgres`` on that very data folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from shared.embedded import EmbeddedPostgres, is_postmaster_of

pytestmark = pytest.mark.faults


def _point_pid_file_at(data_dir: Path, pid: int) -> None:
    pid_file = data_dir / "postmaster.pid"
    lines = pid_file.read_text().splitlines(keepends=True)
    lines[0] = f"{pid}\n"
    with pid_file.open("r+") as out:  # in place: the server's user keeps owning it
        out.write("".join(lines))
        out.truncate()


def test_a_stale_pid_file_naming_a_live_stranger_does_not_stop_the_start(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "data")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pg.start()
        postmaster = pg.proc.pid if pg.proc else 0
        assert is_postmaster_of(postmaster, pg.data_dir)
        assert not is_postmaster_of(postmaster, tmp_path)  # not on another folder
        assert not is_postmaster_of(stranger.pid, pg.data_dir)
        pg.kill()  # SIGKILL: postmaster.pid stays behind
        assert (pg.data_dir / "postmaster.pid").exists()
        _point_pid_file_at(pg.data_dir, stranger.pid)  # its pid went to another process
        pg.start()
        with psycopg.connect(pg.url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
        pg.stop()


def test_a_live_server_on_the_folder_is_not_mistaken_for_a_stale_file(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "data")
    pg.start()
    try:
        second = EmbeddedPostgres(tmp_path / "data")
        with pytest.raises(RuntimeError, match="already runs"):
            second.start()
        with psycopg.connect(pg.url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.stop()
