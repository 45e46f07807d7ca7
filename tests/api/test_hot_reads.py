"""Cached product reads answered ahead of Flask (web/hot_reads.py): the same answer as the
view's, counted in the same metrics; every other case reaches the view."""

from __future__ import annotations

from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from tests.api.conftest import assert_error
from tests.conftest import ADMIN
from web.hot_reads import ENDPOINT


def _count(status: str = "200") -> float:
    labels = {"method": "GET", "endpoint": ENDPOINT, "status": status}
    return REGISTRY.get_sample_value("http_requests_total", labels) or 0.0


def _product(client: FlaskClient, name: str = "Kettle") -> dict[str, object]:
    answer = client.post(
        "/v1/products", json={"name": name, "price": 2_500, "stock": 3}, headers=ADMIN
    )
    assert answer.status_code == 201
    body: dict[str, object] = answer.get_json()
    return body


def test_a_cached_product_is_the_views_answer_byte_for_byte(client: FlaskClient) -> None:
    product = _product(client, name="Théière ☕")  # stored escaped, as jsonify escapes
    before = _count()
    hot = client.get(f"/v1/products/{product['id']}")
    # A trailing slash is not the hot path's: Flask's view answers from the same entry.
    view = client.get(f"/v1/products/{product['id']}/")
    assert hot.status_code == view.status_code == 200
    assert hot.get_data() == view.get_data()
    assert hot.get_json() == product
    assert hot.headers["Content-Type"] == view.headers["Content-Type"] == "application/json"
    assert hot.headers["Content-Length"] == view.headers["Content-Length"]
    assert _count() == before + 2  # both counted under the view's endpoint


def test_what_the_hot_path_does_not_answer_reaches_the_view(client: FlaskClient) -> None:
    product = _product(client)
    # A body without a JSON content type: 415, as for any request (API.md's order).
    answer = client.get(f"/v1/products/{product['id']}", data="x", content_type="text/plain")
    assert_error(answer, 415, "UNSUPPORTED_MEDIA_TYPE")
    # Ids that cannot exist and unknown ones: 404 from the view.
    for path in (
        "/v1/products/0",
        "/v1/products/007",
        f"/v1/products/{2**63}",
        "/v1/products/9" * 1,
    ):
        assert_error(client.get(path), 404, "NOT_FOUND")
    assert_error(client.post(f"/v1/products/{product['id']}"), 405, "METHOD_NOT_ALLOWED")
