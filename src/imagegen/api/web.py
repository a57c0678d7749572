"""The browser page: `/` and the exact files of `imagegen/web/`, plus `/web/config.json`.

The files are read once when the app is built and served from memory, so no request ever touches
the filesystem: nothing to traverse, no symlink to follow, no directory to list. Only the paths
listed here are public when SD_API_KEY is set (the page must load before it can ask for the key);
every API call the page makes still needs the key. None of these routes is in the OpenAPI schema:
they are not part of the API.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from imagegen.errors import NotFoundError

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# Modules need a JavaScript type (and nosniff makes the browser insist on it).
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# No inline script or style anywhere; images may be blob: (fetched with the key) or data:.
# connect-src 'self' keeps the key from ever being sent elsewhere; form-action 'none' means a form
# submitted without its script (which always handles submit) cannot put the prompt in a URL.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

CONFIG_PATH = "/web/config.json"


@dataclass(frozen=True)
class WebFile:
    body: bytes
    media_type: str
    etag: str


class WebAssets:
    """URL path -> file, for the regular files of the web folder whose type is known."""

    def __init__(self, files: dict[str, WebFile]) -> None:
        self.files = files

    @classmethod
    def load(cls, root: Path = WEB_DIR) -> WebAssets:
        files: dict[str, WebFile] = {}
        for path in sorted(root.iterdir()) if root.is_dir() else []:
            media_type = _MEDIA_TYPES.get(path.suffix)
            if media_type is None or path.is_symlink() or not path.is_file():
                continue
            body = path.read_bytes()
            url = "/" if path.name == "index.html" else f"/web/{path.name}"
            files[url] = WebFile(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
        return cls(files)

    @property
    def public_paths(self) -> tuple[str, ...]:
        return (*self.files, CONFIG_PATH)


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    # no-cache: the browser revalidates (cheap, with the ETag), so an upgrade is seen at once.
    return {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache", **(extra or {})}


def make_router(assets: WebAssets, *, auth_required: bool) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def serve(path: str, request: Request) -> Response:
        found = assets.files.get(path)
        if found is None:
            raise NotFoundError("no such file")
        if request.headers.get("if-none-match") == found.etag:
            return Response(status_code=304, headers=_headers({"ETag": found.etag}))
        return Response(found.body, media_type=found.media_type, headers=_headers({"ETag": found.etag}))

    @router.get("/")
    def page(request: Request) -> Response:
        """The browser page."""
        return serve("/", request)

    @router.get(CONFIG_PATH)
    def config() -> JSONResponse:
        """What the page must know before it has a key: whether to ask for one."""
        return JSONResponse({"auth_required": auth_required}, headers=_headers())

    @router.get("/web/{name}")
    def asset(name: str, request: Request) -> Response:
        """A file of the page (script, style, icon)."""
        return serve(f"/web/{name}", request)

    return router
