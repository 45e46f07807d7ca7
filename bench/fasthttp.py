"""A lean HTTP/1.1 client on asyncio protocols, for the open-loop generator.

The load generator shares the 2 cores with the system it measures, so every
microsecond it spends per request is taken from the service.  This client does
only what the harness needs: keep-alive connections to one host, a request
written in one ``write``, a response framed by ``Content-Length`` (or chunked, or
read to the close), a deadline per request.  Against an empty route it costs a
fraction of a general-purpose client's CPU per request (see bench/README.md).

A request on a reused connection that the server closed while it was idle fails
before any byte of an answer arrives; it is sent again once on a new connection
(the server never read it), and counted in ``Pool.resent``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class Disconnected(ConnectionError):
    """The server closed the connection before the whole answer arrived."""


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.got_bytes = False
        self.closed = False
        self.idle_since = 0.0
        self.until_close = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._parse()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.until_close and exc is None:
            end = self.buf.find(b"\r\n\r\n")
            waiter.set_result((int(self.buf[9:12]), bytes(self.buf[end + 4 :]), False))
            return
        waiter.set_exception(exc if exc is not None else Disconnected("server closed"))

    def _parse(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        start = end + 4
        keep = b"\r\nconnection: close" not in head
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17 : j if j > 0 else None])
            if len(buf) < start + length:
                return
            body = bytes(buf[start : start + length])
            del buf[: start + length]
        elif b"\r\ntransfer-encoding: chunked" in head:
            parsed = _dechunk(buf, start)
            if parsed is None:
                return
            body, used = parsed
            del buf[:used]
        else:
            self.until_close = True  # no framing: the body ends with the connection
            return
        assert self.waiter is not None
        self.waiter.set_result((int(head[9:12]), body, keep))


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)
            return (bytes(out), end + 4) if end >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        out += buf[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


class Pool:
    """Keep-alive connections to one ``host:port``; ``await request(...)`` -> (status, body)."""

    def __init__(self, host: str, port: int, *, max_idle: float = 1.0) -> None:
        self.host, self.port = host, port
        self.max_idle = max_idle  # under gunicorn's keep-alive (2 s by default)
        self.idle: list[_Conn] = []
        self.resent = 0
        self.opened = 0
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    @classmethod
    def for_url(cls, base: str, **kwargs: Any) -> Pool:
        hostport = base.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.partition(":")
        return cls(host, int(port or 80), **kwargs)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, self.host, self.port)
        self.opened += 1
        return conn

    def _take(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            # Bytes nobody asked for mean the connection is out of step: never reuse it.
            if not conn.closed and not conn.buf and now - conn.idle_since < self.max_idle:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        return None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: str = "",
        timeout: float = 10.0,
    ) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._host_header
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        data = head + headers.encode() + b"\r\n" + (body or b"")
        conn = self._take()
        if conn is not None:
            try:
                return await self._send(conn, data, timeout)
            except (Disconnected, ConnectionResetError):
                if conn.got_bytes:
                    raise
                self.resent += 1  # closed while idle: the server never read it
        return await self._send(await self._connect(), data, timeout)

    async def _send(self, conn: _Conn, data: bytes, timeout: float) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[int, bytes, bool]] = loop.create_future()
        conn.waiter, conn.got_bytes, conn.until_close = waiter, False, False
        assert conn.transport is not None
        conn.transport.write(data)
        timer = loop.call_later(timeout, _expire, conn, waiter)
        try:
            status, body, keep = await waiter
        except BaseException:
            if conn.transport is not None:
                conn.transport.abort()
            raise
        finally:
            timer.cancel()
        conn.waiter = None
        if keep and not conn.closed:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return status, body

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


def _expire(conn: _Conn, waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no answer in time"))
