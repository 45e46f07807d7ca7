"""Running the real processes for e2e and fault tests: gunicorn, partition worker,
history listener and beat, each a child process with its own log file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from shared.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

COMMANDS: dict[str, list[str]] = {
    "web": [
        str(BIN / "gunicorn"),
        "-c",
        str(ROOT / "web" / "gunicorn_conf.py"),
        "web.wsgi:app",
        "--worker-class",
        "gevent",
        "--workers",
        "%(web_processes)s",
        "--worker-connections",
        "10000",
        "--backlog",
        "2048",
        "--graceful-timeout",
        "5",
        "--keep-alive",
        "5",  # as the Procfile
    ],
    "worker": [sys.executable, "-m", "workers.boot"],
    "history": [
        str(BIN / "celery"),
        "-A",
        "workers.app",
        "worker",
        "--pool=solo",
        "--queues=history,maintenance",
        "--hostname=history-%(tag)s@%%h",
        "--loglevel=WARNING",
    ],
    "beat": [str(BIN / "celery"), "-A", "workers.app", "beat", "--loglevel=WARNING"],
}


def run_in_production(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``python <args>`` from the project root with ``APP_ENV=production`` and servers that
    cannot be reached (plus ``env``): for the checks a process makes of its settings
    before it connects to anything.  Its output is captured; it is not checked."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "APP_ENV": "production",
            "ADMIN_TOKEN": "t",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class Stack:
    """The system's processes against the given database and Redis."""

    database_url: str
    redis_url: str
    log_dir: Path
    admin_token: str = "test-admin-token"
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Where web binds and is reached (a fault test may run it in a network namespace).
    host: str = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def metrics_dir(self) -> Path:
        """PROMETHEUS_MULTIPROC_DIR of this stack's processes (emptied by ``start_all``)."""
        return self.log_dir / f"metrics-{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            ADMIN_TOKEN=self.admin_token,
            APP_ENV="test",
            RATE_LIMIT="off",
            SWEEP_AFTER_SECONDS="3",
            SWEEP_INTERVAL_SECONDS="1",
            PYTHONUNBUFFERED="1",
            PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir),
        )
        env.update(self.extra_env)
        return env

    def start(
        self,
        name: str,
        *,
        worker_id: int | None = None,
        wrap: list[str] | None = None,
        env_overrides: dict[str, str] | None = None,
    ) -> str:
        """Start process ``name``; returns its key in ``procs`` (``worker-<id>`` for a
        partition worker started with its own ``WORKER_ID``).  ``wrap`` prefixes the
        command (``ip netns exec NS``); ``env_overrides`` are this process's own."""
        env = {**self.env(), **(env_overrides or {})}
        values = {"tag": self.port, "web_processes": env.get("WEB_CONCURRENCY", "2")}
        command = [part % values for part in COMMANDS[name]]
        if name == "web":
            command += ["--bind", f"{self.host}:{self.port}"]
        if name == "beat":
            command += [f"--schedule={self.log_dir / f'beat-{self.port}.db'}"]
        command = [*(wrap or []), *command]
        key = name
        if worker_id is not None:
            env["WORKER_ID"] = str(worker_id)
            key = f"{name}-{worker_id}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{key}-{self.port}.log").open("ab")
        self.procs[key] = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if name == "web":
            self.wait_healthy()
        return key

    def start_all(self) -> Stack:
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.metrics_dir.glob("*.db"):
            stale.unlink()
        for name in ("web", "worker", "history", "beat"):
            self.start(name)
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get("web")
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode}; see {self.log_dir}")
            try:
                if requests.get(self.base_url + "/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("web did not become healthy")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)
