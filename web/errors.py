"""One error shape for every 4xx/5xx: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

from shared.domain.errors import DomainError, ErrorCode

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "1"

_DOMAIN_STATUS = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ORDER_STATE_CONFLICT: 409,
}

_HTTP_CODES = {
    400: ErrorCode.VALIDATION_ERROR,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.ORDER_STATE_CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.IDEMPOTENCY_KEY_REUSED,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.UNAVAILABLE,
}


class ApiError(Exception):
    """An HTTP error raised by web's own checks (access, validation, conflicts, availability)."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def validation_error(
    details: list[dict[str, str]], message: str = "request is not valid"
) -> ApiError:
    return ApiError(400, ErrorCode.VALIDATION_ERROR, message, details)


def unavailable(message: str) -> ApiError:
    return ApiError(
        503, ErrorCode.UNAVAILABLE, message, headers={"Retry-After": RETRY_AFTER_SECONDS}
    )


def error_response(
    status: int,
    code: ErrorCode,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    response = jsonify({"error": {"code": code.value, "message": message, "details": details}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def pydantic_details(exc: ValidationError) -> list[dict[str, str]]:
    """One entry per bad field, named as the client spelled it: ``orderLines[0].quantity``."""
    details = []
    for err in exc.errors(include_url=False):
        field = ""
        for part in err["loc"]:
            field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
        details.append({"field": field, "message": err["msg"]})
    return details


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def handle_api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.errorhandler(DomainError)
    def handle_domain_error(exc: DomainError) -> Response:
        return error_response(_DOMAIN_STATUS.get(exc.code, 400), exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def handle_http_exception(exc: HTTPException) -> Response:
        # Start from werkzeug's own response so Allow / Retry-After headers survive.
        status = exc.code or 500
        code = _HTTP_CODES.get(status, ErrorCode.INTERNAL)
        response = exc.get_response()
        message = exc.description or (exc.name if exc.name else "error")
        if status == 404:
            message = "no such resource"
        elif status == 429:
            message = "too many requests from this client; retry later"
            response.headers.setdefault("Retry-After", RETRY_AFTER_SECONDS)
        body = error_response(status, code, message)
        body.status_code = response.status_code
        for name, value in response.headers.items():
            if name.lower() not in ("content-type", "content-length"):
                body.headers[name] = value
        return body

    @app.errorhandler(OperationalError)
    def handle_database_down(exc: OperationalError) -> Response:
        log.warning("database unavailable: %s", exc.orig)
        return error_response(
            503,
            ErrorCode.UNAVAILABLE,
            "the database is unavailable",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )

    @app.errorhandler(DBAPIError)
    def handle_database_error(exc: DBAPIError) -> Response:
        if exc.connection_invalidated:
            log.warning("database connection lost: %s", exc.orig)
            return error_response(
                503,
                ErrorCode.UNAVAILABLE,
                "the database is unavailable",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        log.exception("database error")
        return error_response(500, ErrorCode.INTERNAL, "internal error")

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, ErrorCode.INTERNAL, "internal error")
