"""Declaring an endpoint once: its route, checks, schemas and OpenAPI entry.

``@operation(...)`` registers the Flask route and its OpenAPI description from
the same arguments, and runs the checks in the order API.md fixes: route and
method (Flask), access (401, 403), size (413), content type (415), rate (429),
validation (400), with ``AUTH_MODE=jwt`` a ``userId`` that is not the token's user
(403), then existence of a path id: 404 here for one out of range (it cannot
exist), or from the view for an unknown one.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from flask import Blueprint, Flask, Response, current_app, g, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import BaseConverter
from werkzeug.urls import iri_to_uri

from shared.config import Settings
from shared.domain.errors import ErrorCode
from web.errors import ApiError, pydantic_details, validation_error
from web.identity import (
    TokenVerifier,
    authenticate_admin,
    authenticate_customer,
    current_identity,
    forbidden,
    token_user,
)
from web.schemas import MAX_ID

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

V = TypeVar("V", bound=Callable[..., Any])

log = logging.getLogger(__name__)


class IdConverter(BaseConverter):
    """A path id: any decimal integer routes, so an id that cannot exist (0, negative,
    leading zeros, past 2**63-1) answers 404 after the access and validation checks."""

    regex = r"-?[0-9]+"

    def to_python(self, value: str) -> int:
        canonical = value.isdigit() and not value.startswith("0")
        return int(value) if canonical else 0

    def to_url(self, value: Any) -> str:
        return str(value)


class ApiResponse(Response):
    """Flask's response, handed to the server without werkzeug's per-answer rewrite when
    there is nothing to rewrite.

    werkzeug's ``__call__`` copies the headers, looks for Location, Content-Location and
    Content-Length, and wraps the body in a closing iterator (~4 % of a job POST's CPU in
    web, py-spy).  An answer built from bytes (every JSON answer: ``jsonify`` sets its
    Content-Length) to a method other than HEAD, with a status that has a body, no
    Content-Location, a Location that is already a URI and nothing to call on close,
    comes out of werkzeug byte for byte as it stands: it is handed over as it stands.
    Anything else is werkzeug's.
    """

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = self.response
        status = self.status_code
        if (
            type(body) is list
            and len(body) == 1
            and type(body[0]) is bytes
            and not self.direct_passthrough
            and not self._on_close
            and status >= 200
            and status not in (204, 304)
            and environ["REQUEST_METHOD"] != "HEAD"
        ):
            headers = self.headers.to_wsgi_list()
            if _as_it_stands(headers):
                start_response(self.status, headers)
                return body
        return super().__call__(environ, start_response)


def _as_it_stands(headers: list[tuple[str, str]]) -> bool:
    """Headers werkzeug's ``get_wsgi_headers`` would leave as they are."""
    length = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "content-length":
            length = True
        elif lowered == "content-location" or (
            lowered == "location" and iri_to_uri(value) != value
        ):
            return False
    return length


class RememberedRoutes:
    """werkzeug's route matcher, its matches of recent paths remembered.

    werkzeug walks its state machine of rules for every request (~4 % of a job POST's
    CPU in web, py-spy); most job POSTs go to a few paths (``/v1/orders``,
    ``/v1/points/charge``), so a path matched once is answered from an LRU of
    ``size`` entries.  A match depends only on (domain, path, method, websocket) and the
    rules: adding a rule forgets everything.  Refusals (404, 405, a redirect) are
    exceptions, never remembered.  Each answer gets its own copy of the matched values
    (Flask hands them to the view as keyword arguments).
    """

    def __init__(self, matcher: Any, size: int = 1024) -> None:
        self._matcher = matcher
        self._match = functools.lru_cache(maxsize=size)(matcher.match)

    def match(
        self, domain: str, path: str, method: str, websocket: bool
    ) -> tuple[Any, dict[str, Any]]:
        rule, values = self._match(domain, path, method, websocket)
        return rule, dict(values)

    def add(self, rule: Any) -> None:
        self._match.cache_clear()
        self._matcher.add(rule)

    def update(self) -> None:
        self._match.cache_clear()
        self._matcher.update()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._matcher, name)


def remember_routes(app: Flask) -> None:
    """Put ``RememberedRoutes`` in front of the app's werkzeug matcher."""
    url_map: Any = app.url_map
    if callable(getattr(getattr(url_map, "_matcher", None), "match", None)):  # werkzeug >= 2.2
        url_map._matcher = RememberedRoutes(url_map._matcher)


@dataclass(frozen=True)
class Operation:
    method: str
    rule: str  # Flask rule, e.g. /v1/points/<id:user_id>
    summary: str
    tag: str
    responses: dict[int, type[BaseModel] | None]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    admin: bool = False
    # Acts for a user or reads a user's data: takes the user's token with AUTH_MODE=jwt.
    customer: bool = False
    rate_limited: bool = False
    body_optional: bool = False
    job: bool = False
    headers: dict[int, dict[str, str]] = field(default_factory=dict)
    # Request headers the view reads itself (documented only), e.g. If-Match.
    header_parameters: tuple[dict[str, Any], ...] = ()


OPERATIONS: list[Operation] = []


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads with hooks builds a decoder per call (~1 % of a job POST).
_JSON_BODY = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)


def has_body() -> bool:
    return (
        bool(request.content_length)
        or request.headers.get("Transfer-Encoding", "").lower() == "chunked"
    )


def _read_body() -> bytes:
    limit = settings().max_body_bytes
    try:
        length = request.content_length
        if length is None and has_body():
            # Chunked: werkzeug would silently stop at the limit; read one byte past it.
            raw: bytes = request.environ["wsgi.input"].read(limit + 1)
            if len(raw) > limit:
                raise ApiError(
                    413, ErrorCode.PAYLOAD_TOO_LARGE, f"the body may not exceed {limit} bytes"
                )
            g.body_read = True
            return raw
        if length is not None and length <= limit:
            # Straight from the server's stream: werkzeug's get_data wraps it in a limited
            # stream and reads it through that (~2.5 % of a job POST's CPU in web, py-spy).
            raw = request.environ["wsgi.input"].read(length)
            g.body_read = True
            if len(raw) == length:
                return bytes(raw)
            raise ConnectionError(f"the body ended after {len(raw)} of {length} bytes")
        data = request.get_data(cache=True)  # over MAX_CONTENT_LENGTH: 413 (RequestEntityTooLarge)
        g.body_read = True
        return data
    except (HTTPException, ApiError):
        raise
    except Exception as exc:  # gunicorn's InvalidChunkSize, a client gone mid-body
        raise validation_error([{"field": "", "message": "the body could not be read"}]) from exc


def _settle_unread_body(response: Response) -> Response:
    """After an answer that did not read the request body (a 401, 404, 413 ...).

    Bytes left unread on a kept-alive connection would be parsed as the next
    request; gunicorn discards at most 64 KiB of them and otherwise closes the
    connection after having said ``keep-alive``, so a pooled client's next request
    fails.  A body within the limit is read and dropped here; a larger one (or a
    chunked one that goes on) is left, and the answer says ``Connection: close``.
    """
    if not has_body() or g.get("body_read"):
        return response
    limit = settings().max_body_bytes
    length = request.content_length
    # The server's own stream: werkzeug's refuses a read at its limit (a 413).
    stream = request.environ["wsgi.input"]
    try:
        if length is not None:
            if length <= limit:
                stream.read(length)
                return response
        elif len(stream.read(limit + 1)) <= limit:
            return response  # a chunked body that ended within the limit
    except Exception:  # the client went away mid-body, a broken chunk
        log.info("request body could not be drained; closing the connection")
    response.headers["Connection"] = "close"
    return response


def _honour_connection_close(wsgi_app: WSGIApplication) -> WSGIApplication:
    """Make the server close the connection when the app answers ``Connection: close``.

    gunicorn drops hop-by-hop headers an application sets (PEP 3333) and decides
    keep-alive itself; its ``start_response`` is a method of its response object,
    whose ``force_close()`` makes it answer ``Connection: close`` and close.
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
                force_close = getattr(
                    getattr(start_response, "__self__", None), "force_close", None
                )
                if callable(force_close):
                    force_close()
            return start_response(status, headers, *exc_info)

        return wsgi_app(environ, start)

    return app


def install_connection_handling(app: Flask) -> None:
    """Every answer that leaves a request body unread closes the connection honestly."""
    app.after_request(_settle_unread_body)
    app.wsgi_app = _honour_connection_close(app.wsgi_app)  # type: ignore[method-assign,assignment]  # Flask's middleware idiom


def read_json_body() -> Any:
    """The request body as JSON, refusing duplicate keys, NaN and Infinity."""
    raw = _read_body()
    if not raw:
        raise validation_error(
            [{"field": "", "message": "a JSON body is required"}], "a JSON body is required"
        )
    try:
        # json.loads(bytes) as it decodes them (UTF-8, -16 or -32), with one decoder.
        return _JSON_BODY.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (ValueError, RecursionError) as exc:
        raise validation_error(
            [{"field": "", "message": f"malformed JSON: {exc}"}], "malformed JSON"
        ) from exc


def parse_model(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(pydantic_details(exc)) from exc


def query_or_body(
    field: str, from_query: int | None, from_body: int | None, *, default: int | None = None
) -> int:
    """A value the client may give in the query or the body; both given and different is a
    400; neither given is ``default`` (the token's user), else a 400."""
    given = {v for v in (from_query, from_body) if v is not None}
    if not given and default is not None:
        return default
    if not given:
        raise validation_error(
            [{"field": field, "message": f"{field} is required (query or body)"}]
        )
    if len(given) > 1:
        raise validation_error(
            [{"field": field, "message": f"query and body give different {field}"}]
        )
    return given.pop()


def settings() -> Settings:
    value: Settings = current_app.extensions["settings"]
    return value


def token_verifier() -> TokenVerifier | None:
    """This process's JWT verifier (None unless AUTH_MODE=jwt)."""
    verifier: TokenVerifier | None = current_app.extensions.get("token_verifier")
    return verifier


def require_admin() -> None:
    authenticate_admin(settings(), token_verifier())


def _authenticate(op: Operation) -> None:
    """Access (401, 403): the admin token or scope; with AUTH_MODE=jwt, a customer's token."""
    if op.admin:
        require_admin()
        return
    verifier = token_verifier()
    if op.customer and verifier is not None:
        authenticate_customer(settings(), verifier, acts=op.method != "GET")


def _with_token_user(model: type[BaseModel], data: Any) -> Any:
    """With AUTH_MODE=jwt a body may leave ``userId`` out: the token's user is meant."""
    user = token_user()
    field_info = model.model_fields.get("user_id")
    if (
        user is None
        or field_info is None
        or not field_info.is_required()
        or not isinstance(data, dict)
        or "userId" in data
    ):
        return data
    return {**data, "userId": user}


def _check_acting_user(op: Operation, path_args: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """AUTH_MODE=jwt: a ``userId`` named in the path, query or body is the token's user
    (403 otherwise, nothing recorded); an admin may read any user's data."""
    identity = current_identity()
    if identity is None:
        return
    named = {path_args["user_id"]} if "user_id" in path_args else set()
    for model in (kwargs.get("query"), kwargs.get("body")):
        given = getattr(model, "user_id", None)
        if given is not None:
            named.add(given)
    if len(named) != 1:
        return  # none named, or query and body disagree: the view's 400
    if named.pop() == identity.user_id or (identity.admin and op.method == "GET"):
        return
    raise forbidden("userId is not the token's user")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"the body may not exceed {limit} bytes")


def _check_size() -> None:
    limit = settings().max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)


def _check_content_type() -> None:
    if not has_body():
        return
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(
            415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "a request body must be sent as application/json"
        )


def _refuse_body() -> None:
    """A mutation that takes no body refuses one rather than ignore what it says."""
    data = read_json_body()
    if data == {}:
        return
    fields = list(data) if isinstance(data, dict) else [""]
    raise validation_error([{"field": f, "message": "this endpoint takes no body"} for f in fields])


def _check_path_ids(path_args: dict[str, Any]) -> None:
    for value in path_args.values():
        if isinstance(value, int) and not 1 <= value <= MAX_ID:
            raise NotFound()


def operation(
    bp: Blueprint,
    rule: str,
    method: str,
    *,
    summary: str,
    responses: dict[int, type[BaseModel] | None],
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    admin: bool = False,
    customer: bool = False,
    rate_limited: bool = False,
    body_optional: bool = False,
    job: bool = False,
    header_parameters: tuple[dict[str, Any], ...] = (),
    headers: dict[int, dict[str, str]] | None = None,
) -> Callable[[V], V]:
    """Register ``view`` at ``rule`` on ``bp``; it gets the path args and ``body``/``query``."""
    op = Operation(
        method=method,
        rule=(bp.url_prefix or "") + rule,
        summary=summary,
        tag=bp.name,
        responses=responses,
        body=body,
        query=query,
        admin=admin,
        customer=customer,
        rate_limited=rate_limited,
        body_optional=body_optional,
        job=job,
        header_parameters=header_parameters,
        headers=headers or {},
    )
    OPERATIONS.append(op)

    def decorator(view: V) -> V:
        @functools.wraps(view)
        def wrapper(**path_args: Any) -> Response:
            _authenticate(op)
            _check_size()
            _check_content_type()
            if rate_limited and settings().rate_limit_enabled:
                with current_app.extensions["job_rate_limit"]:
                    pass
            kwargs: dict[str, Any] = dict(path_args)
            if query is not None:
                kwargs["query"] = parse_model(query, request.args.to_dict())
            if body is not None:
                if body_optional and not has_body():
                    kwargs["body"] = None
                else:
                    data = read_json_body()
                    if getattr(kwargs.get("query"), "user_id", None) is None:
                        data = _with_token_user(body, data)
                    kwargs["body"] = parse_model(body, data)
            elif has_body() and method in ("POST", "PUT"):
                _refuse_body()
            if customer:
                _check_acting_user(op, path_args, kwargs)
            _check_path_ids(path_args)
            result: Response = view(**kwargs)
            return result

        bp.add_url_rule(rule, endpoint=view.__name__, view_func=wrapper, methods=[method])
        return wrapper  # type: ignore[return-value]  # same call signature for Flask

    return decorator


# ---- OpenAPI --------------------------------------------------------------

_PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")

_ERROR_TEXT = {
    400: "Validation error (VALIDATION_ERROR); details name each bad field",
    401: "No valid bearer token (UNAUTHENTICATED); WWW-Authenticate says why",
    403: "The token may not do this: not the admin token or scope, or another user's"
    " userId (FORBIDDEN)",
    404: "Unknown id or route (NOT_FOUND)",
    405: "Method not allowed (METHOD_NOT_ALLOWED)",
    409: "Stale version or forbidden transition (ORDER_STATE_CONFLICT)",
    413: "Body over 64 KiB (PAYLOAD_TOO_LARGE)",
    415: "Body without a JSON content type (UNSUPPORTED_MEDIA_TYPE)",
    422: "Idempotency-Key reused with other input (IDEMPOTENCY_KEY_REUSED)",
    429: "Per-client rate limit exceeded (RATE_LIMITED)",
    500: "Unexpected error (INTERNAL)",
    503: "Database or broker unavailable (UNAVAILABLE); nothing was accepted",
}

IDEMPOTENCY_HEADER: dict[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[\\x20-\\x7e]+$"},
}


_ERROR_HEADERS = {
    405: {"Allow": "the methods the path takes"},
    429: {"Retry-After": "seconds to wait"},
    503: {"Retry-After": "seconds to wait"},
}


def _header_objects(headers: dict[str, str]) -> dict[str, Any]:
    return {
        name: {"description": text, "schema": {"type": "string"}} for name, text in headers.items()
    }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def openapi_path(rule: str) -> str:
    """``/v1/points/<id:user_id>`` -> ``/v1/points/{userId}``."""
    return _PARAM.sub(lambda m: "{" + _camel(m.group(2)) + "}", rule)


def _path_parameters(rule: str) -> list[dict[str, Any]]:
    params = []
    for converter, name in _PARAM.findall(rule):
        schema: dict[str, Any] = (
            {"type": "integer", "minimum": 1, "maximum": MAX_ID}
            if converter == "id"
            else {"type": "string", "format": "uuid"}
        )
        params.append({"name": _camel(name), "in": "path", "required": True, "schema": schema})
    return params


def _query_parameters(model: type[BaseModel], defs: dict[str, Any]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    defs.update(schema.get("$defs", {}))
    required = set(schema.get("required", []))
    return [
        {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": _query_value_schema(prop),
        }
        for name, prop in schema.get("properties", {}).items()
    ]


_NULL = {"type": "null"}


def _query_value_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema without pydantic's ``null`` branch: an optional query
    parameter is absent, never the text ``null``."""
    schema = {k: v for k, v in prop.items() if k != "title"}
    options = schema.get("anyOf")
    if not options or _NULL not in options:
        return schema
    rest = [option for option in options if option != _NULL]
    del schema["anyOf"]
    if schema.get("default", 0) is None:
        del schema["default"]
    if len(rest) == 1:
        return {**rest[0], **schema}
    return {**schema, "anyOf": rest}


def _error_statuses(op: Operation, jwt: bool) -> set[int]:
    statuses = {404, 405, 500}
    if op.customer and jwt:
        statuses |= {401, 403, 503}  # 503: a key server that cannot be reached
    if op.body is not None or op.query is not None or op.job:
        statuses.add(400)
    if op.body is not None or op.method in ("POST", "PUT"):
        statuses |= {413, 415}
    if op.admin:
        statuses |= {401, 403}
    if op.rate_limited:
        statuses.add(429)
    if op.job:
        statuses.add(422)
    if op.method in ("PUT", "POST"):
        statuses.add(503)
    return statuses


class _Components:
    """Component schemas of every model the operations name, and refs to them."""

    def __init__(self) -> None:
        from pydantic.json_schema import models_json_schema

        from web.schemas import Body, ErrorBody

        self._body = Body
        self.error = ErrorBody
        models: set[type[BaseModel]] = {ErrorBody}
        for op in OPERATIONS:
            models.update(m for m in op.responses.values() if m is not None)
            if op.body is not None:
                models.add(op.body)
        keyed = [(m, self._mode(m)) for m in sorted(models, key=lambda m: m.__name__)]
        self._keys, top = models_json_schema(
            keyed, ref_template="#/components/schemas/{model}", by_alias=True
        )
        self.schemas: dict[str, Any] = dict(top.get("$defs", {}))

    def _mode(self, model: type[BaseModel]) -> Literal["validation", "serialization"]:
        return "validation" if issubclass(model, self._body) else "serialization"

    def ref(self, model: type[BaseModel]) -> dict[str, Any]:
        return dict(self._keys[(model, self._mode(model))])


def _operation_entry(op: Operation, components: _Components, jwt: bool) -> dict[str, Any]:
    path = openapi_path(op.rule)
    entry: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", path).rstrip("_"),
        "tags": [op.tag],
    }
    params = _path_parameters(op.rule)
    if op.query is not None:
        params += _query_parameters(op.query, components.schemas)
    if op.job:
        params.append(IDEMPOTENCY_HEADER)
    params += op.header_parameters
    if params:
        entry["parameters"] = params
    if op.body is not None:
        entry["requestBody"] = {
            "required": not op.body_optional,
            "content": {"application/json": {"schema": components.ref(op.body)}},
        }
    if op.admin or (op.customer and jwt):
        entry["security"] = [{"bearerAuth": []}]
    responses: dict[str, Any] = {}
    for status, model in op.responses.items():
        response: dict[str, Any] = {"description": _ERROR_TEXT.get(status, "OK")}
        if model is not None:
            response["content"] = {"application/json": {"schema": components.ref(model)}}
        headers = dict(op.headers.get(status, {}))
        if op.job and status == 202:
            headers["Location"] = "the job's status URL"
        if headers:
            response["headers"] = _header_objects(headers)
        responses[str(status)] = response
    error_content = {"application/json": {"schema": components.ref(components.error)}}
    for status in sorted(_error_statuses(op, jwt)):
        error: dict[str, Any] = {"description": _ERROR_TEXT[status], "content": error_content}
        if status in _ERROR_HEADERS:
            error["headers"] = _header_objects(_ERROR_HEADERS[status])
        responses.setdefault(str(status), error)
    entry["responses"] = responses
    return entry


def _user_id_optional(components: _Components) -> None:
    """AUTH_MODE=jwt: a customer body may leave ``userId`` out (the token's user)."""
    for op in OPERATIONS:
        if not op.customer or op.body is None:
            continue
        name = components.ref(op.body)["$ref"].rsplit("/", 1)[-1]
        schema = components.schemas[name]
        if "userId" in schema.get("required", []):
            schema["required"] = [f for f in schema["required"] if f != "userId"]
            schema["properties"]["userId"]["description"] = (
                "left out: the token's user; given: must be the token's user (else 403)"
            )


_BEARER_NONE = (
    "The ADMIN_TOKEN, for admin calls.  (AUTH_MODE=none: customer calls name their userId.)"
)
_BEARER_JWT = (
    "A JWT whose sub is the user (customer calls), or with the admin scope, or the"
    " ADMIN_TOKEN (admin calls)."
)


def build_openapi(title: str, version: str, *, jwt: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every registered operation; ``jwt``: as AUTH_MODE=jwt
    answers (customer calls take a bearer token and may leave ``userId`` out)."""
    components = _Components()
    if jwt:
        _user_id_optional(components)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(openapi_path(op.rule), {})[op.method.lower()] = _operation_entry(
            op, components, jwt
        )
    scheme: dict[str, Any] = {"type": "http", "scheme": "bearer"}
    if jwt:
        scheme["bearerFormat"] = "JWT"
    scheme["description"] = _BEARER_JWT if jwt else _BEARER_NONE
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components.schemas,
            "securitySchemes": {"bearerAuth": scheme},
        },
    }
