"""The API documentation at /docs: Swagger UI from the service's own files (no CDN, whose scripts
would run next to the key a user types in), under the page's strict Content-Security-Policy, and it
works in a real browser under that policy."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from imagegen.api.web import CONTENT_SECURITY_POLICY


@pytest.fixture
def client(serve: Callable[..., httpx.Client], fake_factory) -> httpx.Client:
    factories, _ = fake_factory()
    return serve(factories=factories, default_backend="fake")


def test_the_docs_page_loads_nothing_from_elsewhere(client: httpx.Client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "unsafe" not in page.headers["content-security-policy"]
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(source.startswith("/docs/") for source in sources), sources
    assert "<script>" not in page.text and "cdn" not in page.text.lower()  # no inline script, no CDN
    for source in sources:
        asset = client.get(source)
        assert asset.status_code == 200, source
        assert asset.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert asset.headers["x-content-type-options"] == "nosniff"
    bundle = client.get("/docs/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript") and len(bundle.content) > 500_000
    assert client.get("/docs/index.html").status_code == 404  # only the files the page uses
    assert client.get("/redoc").status_code == 404


def test_swagger_ui_works_under_the_policy(client: httpx.Client, open_page: Callable[..., Any]) -> None:
    probe = open_page(f"{client.base_url}/docs")
    probe.page.wait_for_selector(".swagger-ui .info .title")
    assert "imagegen" in probe.page.inner_text(".swagger-ui .info .title")
    probe.page.wait_for_selector(".opblock")
    assert probe.page.locator(".opblock").count() >= 10  # the operations of /openapi.json are listed
    probe.assert_clean()  # no CSP violation (a console error), nothing fetched from another origin
