"""/docs needs no internet: the page names only this app's own assets, which it serves."""

from __future__ import annotations

import re

from flask.testing import FlaskClient

from tests.api.conftest import assert_error


def test_the_docs_page_loads_swagger_ui_from_this_app(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "//" not in html.replace("<!doctype html>", "")  # no other origin, no CDN
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert set(assets) == {
        "/docs/assets/favicon-32x32.png",
        "/docs/assets/swagger-ui.css",
        "/docs/assets/swagger-ui-bundle.js",
    }
    types = {}
    for path in assets:
        answer = client.get(path)
        assert answer.status_code == 200, path
        assert len(answer.get_data()) > 500, path
        types[path.rsplit(".", 1)[-1]] = answer.mimetype
        answer.close()
    assert types == {"png": "image/png", "css": "text/css", "js": "text/javascript"}
    assert '"/openapi.json"' in html


def test_an_unknown_asset_is_a_json_404(client: FlaskClient) -> None:
    assert_error(client.get("/docs/assets/nope.js"), 404, "NOT_FOUND")
    assert_error(client.get("/docs/assets/../../setup.cfg"), 404, "NOT_FOUND")
