"""/docs in a real headless browser that can reach nothing but this machine.

Swagger UI's scripts and styles come from the app (the ``flask-swagger-ui``
package); the rendered page lists every operation of ``/openapi.json``.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
import requests

from tests.browser import dump_dom, screenshot
from tests.stack import Stack

pytestmark = pytest.mark.e2e


def test_docs_render_every_operation_offline(
    stack: Stack, http: requests.Session, tmp_path: Path
) -> None:
    document = http.get(stack.base_url + "/openapi.json", timeout=10).json()
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    dom = dump_dom(stack.base_url + "/docs", tmp_path, budget_ms=15000)
    rendered = {
        (method, html.unescape(path))
        for method, path in re.findall(
            r'opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"', dom, re.DOTALL
        )
    }
    assert rendered == documented
    assert "Shop API" in dom
    screenshot(stack.base_url + "/docs", tmp_path / "docs.png", tmp_path, size="1400,1600")
