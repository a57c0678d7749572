"""The interactive API documentation at /docs: Swagger UI served by the service itself, under the
same strict Content-Security-Policy as the browser page (api/web.py).

FastAPI's own /docs loads Swagger UI from a CDN (no integrity check: whoever controls the CDN runs
script on the service's origin, next to the key a user types in) and starts it with an inline
script that a strict policy forbids. Here the files come from the pinned `swagger-ui-bundle-v2`
package, read once when the app is built and served from memory, and the start-up script is a
file of its own (/docs/init.js). ReDoc (/redoc) is not offered: it needs inline styles.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from imagegen.api.web import CONTENT_SECURITY_POLICY
from imagegen.errors import NotFoundError

DOCS_PATH = "/docs"

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API documentation</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi_url}"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body>
</html>
"""

# The start-up script: no inline script anywhere, so the policy needs no 'unsafe-inline'.
_INIT = """"use strict";
window.addEventListener("load", () => {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    persistAuthorization: false,
  });
});
"""

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
}
#: The files of the Swagger UI distribution the page uses (nothing else of the package is served).
_DIST_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


@dataclass(frozen=True)
class DocsFile:
    body: bytes
    media_type: str


def _dist_folder() -> Path:
    import swagger_ui_bundle

    return Path(str(swagger_ui_bundle.swagger_ui_path))


def load_files(title: str, openapi_url: str) -> dict[str, DocsFile]:
    """URL path -> file: the page, its start-up script and the distribution's files."""
    folder = _dist_folder()
    files = {
        DOCS_PATH: DocsFile(
            _PAGE.format(title=html.escape(title), openapi_url=html.escape(openapi_url)).encode("utf-8"),
            "text/html; charset=utf-8",
        ),
        f"{DOCS_PATH}/init.js": DocsFile(_INIT.encode("utf-8"), _TYPES[".js"]),
    }
    for name in _DIST_FILES:
        files[f"{DOCS_PATH}/{name}"] = DocsFile((folder / name).read_bytes(), _TYPES[Path(name).suffix])
    return files


def make_router(title: str, openapi_url: str = "/openapi.json") -> APIRouter:
    files = load_files(title, openapi_url)
    router = APIRouter(include_in_schema=False)

    def serve(path: str) -> Response:
        found = files.get(path)
        if found is None:
            raise NotFoundError("no such file")
        # The distribution's files change only with the package: cached a day; the page is checked anew.
        cache = "no-cache" if path in (DOCS_PATH, f"{DOCS_PATH}/init.js") else "public, max-age=86400"
        headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": cache}
        return Response(found.body, media_type=found.media_type, headers=headers)

    @router.get(DOCS_PATH)
    def page() -> Response:
        """The API documentation page."""
        return serve(DOCS_PATH)

    @router.get(DOCS_PATH + "/{name}")
    def asset(name: str, request: Request) -> Response:
        """A file of the documentation page."""
        return serve(request.url.path)

    return router
