"""A TCP proxy in front of the private PostgreSQL that can lose a COMMIT or its answer.

Armed, it lets the COMMIT of a transaction that ran a given statement (a worker's
``UPDATE jobs SET``; or web's ``INSERT INTO jobs``, which runs in autocommit and so
is its own COMMIT) reach the server, then ends the client's connection instead of
relaying the reply: the transaction is committed, the client only sees a broken
connection.  This is what a database
crash or a network cut between "commit durable" and "reply sent" looks like,
made deterministic.  Or it drops the COMMIT itself (the server rolls back).
Every other byte passes unchanged.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

# psycopg sends COMMIT with the simple query protocol ('Q'); the insert is a Parse of
# this text, or, once psycopg has prepared it, a Bind of the prepared statement.
JOB_INSERT = b"INSERT INTO jobs"  # web accepting a job
JOB_FINISH = b"UPDATE jobs SET"  # a worker finishing jobs


class CommitCutter:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self._listener.settimeout(0.5)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._armed = 0
        self._before = False
        self._statement = JOB_INSERT
        self.cuts = 0
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="commit-cutter", daemon=True)
        self._thread.start()

    def url(self, database_url: str) -> str:
        return database_url.replace(f":{self.upstream_port}/", f":{self.port}/")

    def arm(self, cuts: int = 1, *, before: bool = False, statement: bytes = JOB_INSERT) -> None:
        """Lose the answer of the next ``cuts`` COMMITs of transactions that ran ``statement``
        (``before``: lose the COMMIT itself, so the server rolls the transaction back)."""
        with self._lock:
            self._armed = cuts
            self._before = before
            self._statement = statement

    @property
    def armed(self) -> int:
        with self._lock:
            return self._armed

    def _take(self) -> str | None:
        """None, or where to cut this COMMIT: "before" it reaches the server or "after"."""
        with self._lock:
            if self._armed <= 0:
                return None
            self._armed -= 1
            self.cuts += 1
            return "before" if self._before else "after"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            sockets, self._sockets = self._sockets, []
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in sockets:
            _close(sock)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            state = {"matched": False, "cut": False, "in_transaction": False}
            threading.Thread(
                target=self._upstream, args=(client, server, state), daemon=True
            ).start()
            threading.Thread(
                target=self._downstream, args=(client, server, state), daemon=True
            ).start()

    def _upstream(
        self, client: socket.socket, server: socket.socket, state: dict[str, bool]
    ) -> None:
        reader = _FrontendReader()
        try:
            while data := client.recv(65536):
                for kind, body in reader.feed(data):
                    if kind == b"Q" and body.startswith(b"BEGIN"):
                        state["in_transaction"] = True
                    elif kind == b"Q" and body.startswith(b"ROLLBACK"):
                        state["in_transaction"] = state["matched"] = False
                    elif kind == b"Q" and body == b"COMMIT\x00":
                        # The client waits for each answer before sending more, so the
                        # next bytes from the server are this COMMIT's answer.
                        where = self._take() if state["matched"] else None
                        if where == "before":
                            return  # the COMMIT never arrives: the server rolls back
                        state["cut"] = where == "after"
                        state["matched"] = state["in_transaction"] = False
                    elif kind in b"PB" and self._statement in reader.statement(kind, body):
                        # Parsed or bound now, run by the Execute that follows: psycopg
                        # prepares a statement it runs often with a Parse of its own
                        # (and a Sync), which runs nothing and must not be taken for it.
                        state["bound"] = True
                    elif (kind == b"E" and state.pop("bound", False)) or (
                        kind == b"Q" and self._statement in body
                    ):
                        if self._run(state) == "before":
                            return  # never sent: nothing is committed
                    elif kind == b"S":
                        state.pop("bound", None)
                server.sendall(data)
        except OSError:
            pass
        finally:
            _close(server)
            _close(client)

    def _run(self, state: dict[str, bool]) -> str | None:
        """The statement runs: in a transaction it marks the COMMIT to come; in
        autocommit (web's job INSERT) it is its own COMMIT, cut here if armed."""
        if state["in_transaction"]:
            state["matched"] = True
            return None
        where = self._take()
        state["cut"] = where == "after"
        return where

    def _downstream(
        self, client: socket.socket, server: socket.socket, state: dict[str, bool]
    ) -> None:
        try:
            while data := server.recv(65536):
                if state["cut"]:
                    break  # the answer to COMMIT is lost: the client's connection just ends
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)


class _FrontendReader:
    """Splits the client's byte stream into protocol messages (type, body).

    The start-up packets (SSL/GSS requests, start-up message) carry no type byte.
    Prepared statements are remembered by name, so that a statement is recognised
    when psycopg only binds a statement it prepared earlier.
    """

    SSL_OR_GSS = {80877103, 80877104}

    def __init__(self) -> None:
        self._buffer = b""
        self._starting = True
        self._prepared: dict[bytes, bytes] = {}

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        messages: list[tuple[bytes, bytes]] = []
        while True:
            if self._starting:
                if len(self._buffer) < 8:
                    return messages
                (length,) = struct.unpack("!i", self._buffer[:4])
                if len(self._buffer) < length:
                    return messages
                (code,) = struct.unpack("!i", self._buffer[4:8])
                self._buffer = self._buffer[length:]
                self._starting = code in self.SSL_OR_GSS
                continue
            if len(self._buffer) < 5:
                return messages
            (length,) = struct.unpack("!i", self._buffer[1:5])
            if len(self._buffer) < 1 + length:
                return messages
            messages.append((self._buffer[:1], self._buffer[5 : 1 + length]))
            self._buffer = self._buffer[1 + length :]

    def statement(self, kind: bytes, body: bytes) -> bytes:
        """The SQL text a Query, Parse or Bind message runs (b"" for other messages)."""
        if kind == b"Q":
            return body
        if kind == b"P":  # Parse: statement name, query
            name, _, rest = body.partition(b"\x00")
            text = rest.partition(b"\x00")[0]
            if name:
                self._prepared[name] = text
            return text
        if kind == b"B":  # Bind: portal name, statement name
            return self._prepared.get(body.partition(b"\x00")[2].partition(b"\x00")[0], b"")
        return b""


def _close(sock: socket.socket) -> None:
    # shutdown() first: close() alone would not wake the other thread's recv() on it.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
