"""Property-based checks of every operation against the app's own OpenAPI document.

Schemathesis generates valid and invalid requests from the document; every
answer must not be a server error, must match its documented schema and must
use a documented status code.  The app runs on the rolled-back test session
with a recording publisher, so nothing it writes survives the test.

The document is built at import, the same way ``GET /openapi.json`` builds it
(a test below checks they are equal): schemathesis 4's ``from_fixture`` loader
sets ``request.node._nodeid``, which pytest 9 no longer has.
"""

from __future__ import annotations

import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

import web  # noqa: F401  (registers every operation)
from tests.conftest import ADMIN
from web.api import build_openapi

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
DOCUMENT = build_openapi("Shop API", "1.0.0")

schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_fuzzed_document_is_the_served_one(client: FlaskClient) -> None:
    assert client.get("/openapi.json").get_json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_operation_conforms(app: Flask, case: schemathesis.Case) -> None:
    headers = None
    if case.operation.definition.raw.get("security") and not (case.headers or {}).get(
        "Authorization"
    ):
        headers = dict(ADMIN)  # also reach past the access check
    case.call_and_validate(app=app, headers=headers, checks=CHECKS)
