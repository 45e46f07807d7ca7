"""The OpenAPI document describes exactly the registered routes, and is valid OpenAPI 3.1."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
from flask import Flask
from flask.testing import FlaskClient

# openapi-spec-validator is not installed; schemathesis (a dev dependency) ships the
# official OpenAPI 3.1 meta-schema, which jsonschema-rs applies as Draft 2020-12.
from schemathesis.specs.openapi.definitions import OPENAPI_31

from web.api import openapi_path

JOB_OPERATIONS = {
    ("post", "/v1/points/charge"),
    ("post", "/v1/points/use"),
    ("put", "/v1/products/{productId}/stock"),
    ("post", "/v1/orders"),
    ("post", "/v1/coupons/{couponId}/issue"),
    ("post", "/v1/orders/{orderId}/payment"),
}
ADMIN_OPERATIONS = {
    ("post", "/v1/products"),
    ("put", "/v1/products/{productId}/stock"),
    ("post", "/v1/coupons"),
    ("put", "/v1/orders/{orderId}/status"),
    ("get", "/v1/admin/partitions"),
}
API_MD_OPERATIONS = (
    JOB_OPERATIONS
    | ADMIN_OPERATIONS
    | {
        ("get", "/v1/jobs/{jobId}"),
        ("get", "/v1/points/{userId}"),
        ("get", "/v1/points/{userId}/histories"),
        ("get", "/v1/products"),
        ("get", "/v1/products/{productId}"),
        ("get", "/v1/products/top"),
        ("get", "/v1/orders/{orderId}"),
        ("get", "/v1/orders/{orderId}/histories"),
        ("get", "/v1/coupons/{couponId}"),
        ("get", "/v1/users/{userId}/coupons"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/openapi.json"),
        ("get", "/docs"),
        ("get", "/metrics"),
    }
)


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    answer = client.get("/openapi.json")
    assert answer.status_code == 200
    assert answer.mimetype == "application/json"
    body: dict[str, Any] = answer.get_json()
    return body


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_paths_and_methods_equal_the_registered_routes(
    app: Flask, document: dict[str, Any]
) -> None:
    registered = {
        (method.lower(), openapi_path(rule.rule))
        for rule in app.url_map.iter_rules()
        if not rule.endpoint.endswith("static")  # files (Swagger UI's assets), not operations
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    documented = {(method, path) for method, path, _ in _operations(document)}
    assert documented == registered


def test_the_routes_are_the_ones_api_md_lists(document: dict[str, Any]) -> None:
    assert {(method, path) for method, path, _ in _operations(document)} == API_MD_OPERATIONS


def test_it_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    validator = jsonschema_rs.Draft202012Validator(OPENAPI_31)
    errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    refs = set(_refs(document))
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_operations_are_complete(document: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in _operations(document)]
    assert len(ids) == len(set(ids))
    for method, path, operation in _operations(document):
        where = f"{method.upper()} {path}"
        assert operation["summary"], where
        params = operation.get("parameters", [])
        keys = [(p["name"], p["in"]) for p in params]
        assert len(keys) == len(set(keys)), where
        in_path = set(re.findall(r"{(\w+)}", path))
        assert {p["name"] for p in params if p["in"] == "path"} == in_path, where
        assert all(p["required"] for p in params if p["in"] == "path"), where
        assert all(
            re.fullmatch(r"[a-z][A-Za-z]*", p["name"]) for p in params if p["in"] != "header"
        )
        responses = operation["responses"]
        assert all(r["description"] for r in responses.values()), where
        assert {"404", "405", "500"} <= set(responses), where
        for status, response in responses.items():
            if status.startswith(("4", "5")) and (method, path, status) != (
                "get",
                "/readyz",
                "503",
            ):
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorBody"
                }, f"{where} {status}"


def test_job_and_admin_operations_document_their_answers(document: dict[str, Any]) -> None:
    operations = {(m, p): op for m, p, op in _operations(document)}
    for key in JOB_OPERATIONS:
        operation = operations[key]
        assert "Location" in operation["responses"]["202"]["headers"], key
        assert {"400", "422", "503"} <= set(operation["responses"]), key
        header = [p for p in operation["parameters"] if p["in"] == "header"]
        assert [p["name"] for p in header] == ["Idempotency-Key"], key
    for key in ADMIN_OPERATIONS:
        operation = operations[key]
        assert operation["security"] == [{"bearerAuth": []}], key
        assert {"401", "403"} <= set(operation["responses"]), key
    for key in set(operations) - ADMIN_OPERATIONS:
        assert "security" not in operations[key], key
        assert "401" not in operations[key]["responses"], key
    assert "409" in operations[("put", "/v1/orders/{orderId}/status")]["responses"]
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert {k: v for k, v in scheme.items() if k != "description"} == {
        "type": "http",
        "scheme": "bearer",
    }
    assert "ADMIN_TOKEN" in scheme["description"]


def test_request_bodies_are_strict_camel_case_objects(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    bodies = [
        op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for _, _, op in _operations(document)
        if "requestBody" in op
    ]
    assert len(bodies) == 8
    for ref in bodies:
        schema = schemas[ref.rsplit("/", 1)[1]]
        assert schema["type"] == "object"
        assert schema["additionalProperties"] is False, ref
        assert all("_" not in name for name in schema["properties"]), ref


def test_documented_ranges_follow_api_md(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    product = schemas["ProductCreate"]["properties"]
    assert (product["name"]["minLength"], product["name"]["maxLength"]) == (1, 200)
    assert "pattern" in product["name"]
    assert (product["price"]["minimum"], product["price"]["maximum"]) == (0, 1_000_000_000)
    points = schemas["PointsRequest"]["properties"]
    assert (points["amount"]["minimum"], points["amount"]["maximum"]) == (1, 1_000_000)
    assert (points["userId"]["minimum"], points["userId"]["maximum"]) == (1, 2**63 - 1)
    coupon = schemas["CouponCreate"]["properties"]
    assert coupon["totalQuantity"]["maximum"] == 10_000_000
    assert coupon["discountAmount"]["minimum"] == 1
    order = schemas["OrderCreate"]["properties"]["orderLines"]
    assert (order["minItems"], order["maxItems"]) == (1, 50)
    line = schemas["OrderLineIn"]["properties"]
    assert (line["quantity"]["minimum"], line["quantity"]["maximum"]) == (1, 1_000)
    payment = schemas["PaymentBody"]
    assert payment["required"] == ["userId"]
    # couponId may be left out, but given it is an id: never null.
    assert {k: v for k, v in payment["properties"]["couponId"].items() if k != "title"} == {
        "type": "integer",
        "minimum": 1,
        "maximum": 2**63 - 1,
    }


def _keywords(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            if key not in ("properties", "example", "examples", "default"):
                yield from _keywords(value)
    elif isinstance(node, list):
        for value in node:
            yield from _keywords(value)


def test_parameter_schemas_use_json_schema_keywords(document: dict[str, Any]) -> None:
    for method, path, operation in _operations(document):
        for param in operation.get("parameters", []):
            where = f"{method.upper()} {path} {param['name']}"
            schema = param["schema"]
            # pydantic's own constraint names are not JSON Schema and would go unenforced.
            assert not {"ge", "le", "gt", "lt"} & set(_keywords(schema)), where
            # An optional query parameter is absent, never the text "null".
            assert "null" not in json.dumps(schema), where


def test_query_parameter_ranges(document: dict[str, Any]) -> None:
    def query(method: str, path: str) -> dict[str, dict[str, Any]]:
        operation = document["paths"][path][method]
        return {p["name"]: p["schema"] for p in operation["parameters"] if p["in"] == "query"}

    listing = query("get", "/v1/products")
    assert (listing["size"]["minimum"], listing["size"]["maximum"]) == (1, 100)
    assert listing["page"]["minimum"] == 1
    assert (listing["minPrice"]["minimum"], listing["maxPrice"]["maximum"]) == (0, 1_000_000_000)
    assert listing["inStock"] == {"type": "boolean"}
    assert listing["sort"]["enum"] == ["id", "name", "price", "createdAt"]
    assert listing["order"]["enum"] == ["asc", "desc"]
    top = query("get", "/v1/products/top")
    assert (top["days"]["minimum"], top["days"]["maximum"], top["days"]["default"]) == (1, 30, 3)
    assert (top["limit"]["minimum"], top["limit"]["maximum"], top["limit"]["default"]) == (
        1,
        100,
        5,
    )
    wait = query("get", "/v1/jobs/{jobId}")["wait"]
    assert (wait["minimum"], wait["maximum"], wait["type"]) == (0, 30, "integer")
    stock = query("put", "/v1/products/{productId}/stock")["stock"]
    assert (stock["minimum"], stock["maximum"]) == (0, 1_000_000_000)
    status = document["paths"]["/v1/orders/{orderId}/status"]["put"]["parameters"]
    assert {p["name"]: p["required"] for p in status} == {
        "orderId": True,
        "status": True,
        "If-Match": False,
    }
