"""web/gunicorn_conf.py's drop-ins for gunicorn internals (loaded by path, as gunicorn does)."""

from __future__ import annotations

import email.utils
import importlib.util
import re
import socket
import time
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

from tests.stack import ROOT


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "web/gunicorn_conf.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_date_header_is_this_seconds_http_date() -> None:
    conf = _load()
    for _ in range(3):
        before = int(time.time())
        header = conf.http_date_of_this_second()
        after = int(time.time())
        assert header in {
            email.utils.formatdate(second, usegmt=True) for second in range(before, after + 1)
        }
    # An explicit timestamp is formatted as gunicorn would.
    assert conf.http_date_of_this_second(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


def test_the_date_moves_on_with_the_clock() -> None:
    conf = _load()
    first = conf.http_date_of_this_second()
    deadline = time.monotonic() + 3
    while conf.http_date_of_this_second() == first:
        assert time.monotonic() < deadline, "the Date header stayed for over a second"
        time.sleep(0.05)


class _CountingSocket:
    """One end of a real socket pair that counts the sends made on it (``send`` and
    ``sendall`` alike: each is a system call or more)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sends = sock, 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self.sock.send(data)

    def sendall(self, data: bytes) -> None:
        self.sends += 1
        self.sock.sendall(data)


def _answer(
    write: Callable[[Any, bytes], None],
    status: str,
    headers: list[tuple[str, str]],
    parts: list[bytes],
    method: str = "POST",
) -> tuple[bytes, int]:
    """What gunicorn puts on the wire for one answer, and in how many sends."""
    from gunicorn.config import Config
    from gunicorn.http import wsgi

    ours, theirs = socket.socketpair()
    with ours, theirs:
        counting = _CountingSocket(ours)
        request = SimpleNamespace(version=(1, 1), method=method, should_close=lambda: False)
        response = wsgi.Response(request, counting, Config())
        response.start_response(status, headers)
        for part in parts:
            write(response, part)
        response.close()
        ours.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := theirs.recv(65536):
            received += chunk
    return received, counting.sends


def test_an_answer_in_one_part_goes_out_in_one_send_as_gunicorn_would_write_it() -> None:
    conf = _load()
    body = b'{"jobId": "0190"}'
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    ours, sends = _answer(conf.write_head_with_body, "202 ACCEPTED", headers, [body])
    theirs, their_sends = _answer(conf._write_in_two_sends, "202 ACCEPTED", headers, [body])
    assert sends == 1
    assert their_sends == 2
    assert ours.replace(b"\r\n", b"\n").split(b"\n")[0] == b"HTTP/1.1 202 ACCEPTED"
    assert ours.endswith(b"\r\n\r\n" + body)
    assert _without_date(ours) == _without_date(theirs)
    # A body in two parts: the head goes with the first, the second is sent by itself.
    headers = [("Content-Length", "4")]
    ours, sends = _answer(conf.write_head_with_body, "200 OK", headers, [b"ab", b"cd"], "GET")
    theirs, their_sends = _answer(
        conf._write_in_two_sends, "200 OK", headers, [b"ab", b"cd"], "GET"
    )
    assert (sends, their_sends) == (2, 3)
    assert _without_date(ours) == _without_date(theirs)


def test_other_answers_are_written_by_gunicorn_itself() -> None:
    conf = _load()
    cases: list[tuple[str, list[tuple[str, str]], list[bytes], str]] = [
        ("200 OK", [("Content-Type", "text/plain")], [b"a", b"b"], "GET"),  # chunked
        ("204 NO CONTENT", [], [b""], "DELETE"),  # no body
        ("200 OK", [("Content-Length", "3")], [b"abc"], "HEAD"),  # HEAD: no body
        ("200 OK", [("Content-Length", "2")], [b"abc"], "GET"),  # past Content-Length
    ]
    for status, headers, parts, method in cases:
        ours = _answer(conf.write_head_with_body, status, headers, parts, method)
        theirs = _answer(conf._write_in_two_sends, status, headers, parts, method)
        assert (_without_date(ours[0]), ours[1]) == (_without_date(theirs[0]), theirs[1])


def _without_date(raw: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"", raw)


class _ShortSendSocket:
    """A socket whose ``send`` takes at most ``room`` bytes, as a full buffer would."""

    def __init__(self, room: int) -> None:
        self.room, self.wire = room, b""
        self.calls: list[tuple[str, int]] = []

    def send(self, data: bytes) -> int:
        taken = bytes(data[: self.room])
        self.calls.append(("send", len(taken)))
        self.wire += taken
        return len(taken)

    def sendall(self, data: bytes) -> None:
        self.calls.append(("sendall", len(data)))
        self.wire += bytes(data)


def test_what_one_send_did_not_take_goes_to_sendall() -> None:
    conf = _load()
    payload = bytes(range(256)) * 40
    short = _ShortSendSocket(room=1000)
    conf.send_whole(short, payload)
    assert short.wire == payload
    assert short.calls == [("send", 1000), ("sendall", len(payload) - 1000)]
    roomy = _ShortSendSocket(room=len(payload))
    conf.send_whole(roomy, payload)
    assert (roomy.wire, roomy.calls) == (payload, [("send", len(payload))])
