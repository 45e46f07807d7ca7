"""The load generator's HTTP client (bench/fasthttp.py) against a scripted local server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bench.fasthttp import Disconnected, Pool

# (request head, its number on its connection from 1) -> raw answer; None: close; b"": hang
Handler = Callable[[bytes, int], bytes | None]


async def serve(handler: Handler) -> tuple[asyncio.Server, int, list[bytes]]:
    seen: list[bytes] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nth = 0
        try:
            while True:
                nth += 1
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                seen.append(head + body)
                answer = handler(head, nth)
                if answer is None:
                    break
                if not answer:  # say nothing, hold the connection
                    await asyncio.sleep(30)
                writer.write(answer)
                await writer.drain()
                framed = b"Content-Length" in answer or b"chunked" in answer
                if b"Connection: close" in answer or not framed:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_content_length_keep_alive_and_request_bytes() -> None:
    async def scenario() -> None:
        server, port, seen = await serve(
            lambda _h, _n: b'HTTP/1.1 202 Accepted\r\nContent-Length: 11\r\n\r\n{"a": "b"}\n'
        )
        pool = Pool("127.0.0.1", port)
        for _ in range(3):
            assert await pool.request("POST", "/v1/x", b'{"k":1}', "Prefer: wait=5\r\n") == (
                202,
                b'{"a": "b"}\n',
            )
        assert pool.opened == 1  # one kept-alive connection served all three
        assert seen[0].startswith(b"POST /v1/x HTTP/1.1\r\n")
        assert b"\r\nPrefer: wait=5\r\n" in seen[0]
        assert b"\r\nContent-Length: 7\r\n" in seen[0]
        assert seen[0].endswith(b'\r\n\r\n{"k":1}')
        pool.close()
        server.close()

    run(scenario())


def test_chunked_and_close_delimited_bodies() -> None:
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nall of it",
        ]
    )

    async def scenario() -> None:
        server, port, _ = await serve(lambda _h, _n: next(answers))
        pool = Pool("127.0.0.1", port)
        assert await pool.request("GET", "/a") == (200, b"abcdef")
        assert await pool.request("GET", "/b") == (404, b"all of it")
        pool.close()
        server.close()

    run(scenario())


def test_a_request_the_server_dropped_unread_on_a_kept_connection_is_sent_again() -> None:
    # The race of a keep-alive connection closed by the server as the client reuses it:
    # the second request on any connection is dropped without a byte of answer.
    def handler(_head: bytes, nth: int) -> bytes | None:
        return None if nth == 2 else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def scenario() -> None:
        server, port, seen = await serve(handler)
        pool = Pool("127.0.0.1", port)
        assert await pool.request("GET", "/1") == (200, b"ok")
        assert await pool.request("GET", "/2") == (200, b"ok")
        assert (pool.opened, pool.resent, len(seen)) == (2, 1, 3)
        pool.close()
        server.close()

    run(scenario())


def test_an_idle_connection_past_max_idle_is_not_reused() -> None:
    async def scenario() -> None:
        server, port, _ = await serve(
            lambda _h, _n: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        pool = Pool("127.0.0.1", port, max_idle=0.05)
        await pool.request("GET", "/1")
        await asyncio.sleep(0.1)
        await pool.request("GET", "/2")
        assert (pool.opened, pool.resent) == (2, 0)
        pool.close()
        server.close()

    run(scenario())


def test_timeout_and_disconnect_are_errors() -> None:
    async def scenario() -> None:
        server, port, _ = await serve(lambda head, _n: None if b"/gone" in head else b"")
        pool = Pool("127.0.0.1", port)
        with pytest.raises(TimeoutError):
            await pool.request("GET", "/silent", timeout=0.2)
        with pytest.raises(Disconnected):
            await pool.request("GET", "/gone")
        pool.close()
        server.close()

    run(scenario())
