"""The page over plain HTTP: `/` and its files are served (without the key when one is set) with a
Content-Security-Policy and nosniff; only those exact files are public; `/api/*` still needs the key
and its 401 asks for Bearer, never Basic (which would pop the browser's login dialog).

Threats: stored/reflected XSS through inline script (CSP), MIME sniffing, the page's public paths
becoming a way around the key, directory listing of the package."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from imagegen.api.web import WEB_DIR, WebAssets

KEY = "web-http-Canary-91f3"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


@pytest.fixture
def client(serve: Callable[..., httpx.Client], fake_factory) -> httpx.Client:
    factories, _ = fake_factory()
    return serve(api_key=KEY, factories=factories, default_backend="fake")


def assert_page_headers(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert directives["img-src"] == "'self' data: blob:"
    assert directives["connect-src"] == "'self'"
    assert "unsafe" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_page_and_every_file_load_without_the_key(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert_page_headers(page)
    files = sorted(path.name for path in WEB_DIR.iterdir() if path.suffix in TYPES and path.name != "index.html")
    assert {"main.js", "style.css", "icon.svg"} <= set(files)
    for name in files:
        response = client.get(f"/web/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"].startswith(TYPES[Path(name).suffix]), name
        assert_page_headers(response)
    assert client.get("/web/config.json").json() == {"auth_required": True}


def test_the_api_still_needs_the_key_and_never_asks_for_basic(client: httpx.Client) -> None:
    for path in ("/api/backends", "/api/jobs", "/info", "/docs", "/api/images/20260101-000000-aaaaaaaaaaaa.png"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer"), path
    assert client.get("/api/backends", headers={"X-API-Key": KEY}).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/web/",
        "/web",
        "/web/nope.js",
        "/web/..%2Fmain.py",
        "/web/%2e%2e/api/web.py",
        "/web/index.html",
        "/index.html",
        "/web/../api/web.py",
        "/web/main.js/",
        "/web/MAIN.JS",
    ],
)
def test_only_the_exact_files_are_public_and_nothing_is_listed(client: httpx.Client, path: str) -> None:
    # Without the key: not public. With it: no such file (no listing, no way out of the folder).
    assert client.get(path).status_code == 401
    with_key = client.get(path, headers={"X-API-Key": KEY})
    if with_key.status_code == 307:  # Starlette's trailing-slash redirect: to the exact file only
        assert with_key.headers["location"].endswith(path.rstrip("/")), with_key.headers["location"]
    else:
        assert with_key.status_code in (404, 405), (path, with_key.status_code)
    assert "import " not in with_key.text and "<!doctype" not in with_key.text.lower()


def test_without_a_key_the_page_says_so(serve: Callable[..., httpx.Client], fake_factory) -> None:
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake")
    assert client.get("/web/config.json").json() == {"auth_required": False}
    assert_page_headers(client.get("/"))


def test_revalidation_answers_304(client: httpx.Client) -> None:
    first = client.get("/web/main.js")
    assert first.headers["cache-control"] == "no-cache"
    again = client.get("/web/main.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_the_page_is_not_in_the_api_schema(client: httpx.Client) -> None:
    paths = client.get("/openapi.json", headers={"X-API-Key": KEY}).json()["paths"]
    assert not [path for path in paths if path == "/" or path.startswith("/web")]


def test_everything_the_page_references_is_served(client: httpx.Client) -> None:
    """No build step: the files reference each other directly, so a missing one would only show in a
    browser. Check every src/href of the page and every module import."""
    public = set(WebAssets.load().public_paths)
    html = client.get("/").text
    assert "<script>" not in html and " style=" not in html  # nothing inline for the CSP to refuse
    referenced = {"/" + ref for ref in re.findall(r'(?:src|href)="(web/[^"]+)"', html)}
    for script in WEB_DIR.glob("*.js"):
        referenced |= {f"/web/{name}" for name in re.findall(r'from "\./([\w-]+\.js)"', script.read_text())}
    assert referenced and referenced <= public, referenced - public
    for path in referenced:
        assert client.get(path).status_code == 200, path


def test_symlinks_and_unknown_types_are_never_served(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("export {};")
    (tmp_path / "notes.txt").write_text("private")
    (tmp_path / "secret.js").symlink_to(tmp_path / "app.js")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.js").write_text("export {};")
    assert sorted(WebAssets.load(tmp_path).files) == ["/", "/web/app.js"]
