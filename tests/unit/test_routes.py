"""web.api's shortcuts through werkzeug: RememberedRoutes (matches of recent paths
remembered, refusals not) and ApiResponse (an answer handed over as werkzeug would)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask, Response
from werkzeug.exceptions import MethodNotAllowed, NotFound

from web.api import ApiResponse, IdConverter, RememberedRoutes, remember_routes


def _app() -> Flask:
    app = Flask(__name__)
    app.url_map.converters["id"] = IdConverter
    app.add_url_rule("/v1/orders", "post_order", lambda: "", methods=["POST"])
    app.add_url_rule(
        "/v1/orders/<id:order_id>/payment", "post_payment", lambda order_id: "", methods=["POST"]
    )
    remember_routes(app)
    return app


def _match(app: Flask, path: str, method: str) -> tuple[str, dict[str, object]]:
    adapter = app.url_map.bind("localhost")
    rule, values = adapter.match(path, method, return_rule=True)
    return rule.endpoint, values


def test_a_path_matched_again_is_remembered_and_answers_the_same() -> None:
    app = _app()
    matcher = app.url_map._matcher  # type: ignore[attr-defined]
    assert isinstance(matcher, RememberedRoutes)
    first = _match(app, "/v1/orders/12/payment", "POST")
    first[1]["order_id"] = 99  # a view that changes its arguments changes only its copy
    second = _match(app, "/v1/orders/12/payment", "POST")
    assert first[0] == second[0] == "post_payment"
    assert second[1] == {"order_id": 12}
    assert _match(app, "/v1/orders/13/payment", "POST")[1] == {"order_id": 13}
    assert _match(app, "/v1/orders", "POST") == ("post_order", {})
    info = matcher._match.cache_info()
    assert (info.hits, info.misses) == (1, 3)


def test_refusals_are_raised_every_time_not_remembered() -> None:
    app = _app()
    for _ in range(2):
        with pytest.raises(MethodNotAllowed):
            _match(app, "/v1/orders", "GET")
        with pytest.raises(NotFound):
            _match(app, "/v1/nothing", "POST")
    assert app.url_map._matcher._match.cache_info().currsize == 0  # type: ignore[attr-defined]


def test_a_rule_added_later_is_found_for_a_path_refused_before() -> None:
    app = _app()
    assert _match(app, "/v1/orders", "POST") == ("post_order", {})
    with pytest.raises(NotFound):
        _match(app, "/v1/coupons", "POST")
    app.add_url_rule("/v1/coupons", "post_coupon", lambda: "", methods=["POST"])
    assert _match(app, "/v1/coupons", "POST") == ("post_coupon", {})
    assert _match(app, "/v1/orders", "POST") == ("post_order", {})


# ---- ApiResponse: werkzeug's rewrite skipped only where it would change nothing ----


def _served(response: Response, method: str) -> tuple[str, list[tuple[str, str]], bytes]:
    """What a WSGI server gets from ``response``: status, headers, body."""
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None):  # type: ignore[no-untyped-def]
        started.append((status, headers))

    environ = {
        "REQUEST_METHOD": method,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "PATH_INFO": "/v1/orders",
    }
    chunks = response(environ, start_response)
    body = b"".join(chunks)
    getattr(chunks, "close", lambda: None)()
    ((status, headers),) = started
    return status, headers, body


def _json_answer(status: int = 200, **headers: str) -> Callable[[], Response]:
    def build() -> Response:
        response = ApiResponse(b'{"jobId": "x"}\n', status=status, mimetype="application/json")
        for name, value in headers.items():
            response.headers[name.replace("_", "-")] = value
        return response

    return build


def _answers() -> list[tuple[str, Callable[[], Response]]]:
    return [
        ("accepted", _json_answer(202, Location="/v1/jobs/0190")),
        ("ok", _json_answer(200)),
        ("error", _json_answer(400)),
        ("no content", _json_answer(204)),
        ("not modified", _json_answer(304)),
        ("an IRI location", _json_answer(202, Location="/v1/jobs/é")),
        ("content location", _json_answer(200, Content_Location="/v1/é")),
        ("streamed", lambda: ApiResponse(iter([b"a", b"b"]), mimetype="text/plain")),
        ("text", lambda: ApiResponse("plain text", mimetype="text/plain")),
    ]


@pytest.mark.parametrize("method", ["POST", "GET", "HEAD"])
def test_an_answer_reaches_the_server_as_werkzeug_would_hand_it_over(method: str) -> None:
    for name, build in _answers():
        ours = _served(build(), method)
        theirs = _served(_werkzeug_response(build()), method)
        assert ours == theirs, name


def test_what_is_called_on_close_is_called() -> None:
    closed: list[bool] = []
    response = ApiResponse(b"{}", mimetype="application/json")
    response.call_on_close(lambda: closed.append(True))
    _served(response, "POST")
    assert closed == [True]


def _werkzeug_response(response: ApiResponse) -> Response:
    """The same response, served by werkzeug's own ``__call__``."""
    plain = Response.__new__(Response)
    plain.__dict__.update(response.__dict__)
    return plain


def test_a_json_answer_is_handed_over_without_werkzeugs_rewrite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rewrites: list[int] = []
    rewrite = Response.get_wsgi_headers

    def counted(self: Response, environ: dict[str, object]) -> object:
        rewrites.append(self.status_code)
        return rewrite(self, environ)  # type: ignore[arg-type]

    monkeypatch.setattr(Response, "get_wsgi_headers", counted)
    _served(_json_answer(202, Location="/v1/jobs/0190")(), "POST")
    _served(_json_answer(400)(), "GET")
    assert rewrites == []
    _served(_json_answer(202, Location="/v1/jobs/0190")(), "HEAD")
    _served(_json_answer(204)(), "POST")
    assert rewrites == [202, 204]
