"""The FastAPI application: `create_app(settings)` for tests and embedding, and the module-level
`app` for `uvicorn imagegen.main:app --host 0.0.0.0 --port 7860`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from imagegen import __version__, preflight
from imagegen.api import docs, generate, health, images, jobs, loras, presenters, web
from imagegen.api import metrics as metrics_api
from imagegen.api.a1111 import probes as a1111_probes
from imagegen.api.a1111 import routes as a1111
from imagegen.api.errors import install_error_handlers
from imagegen.api.middleware import (
    ApiKeyMiddleware,
    BodyGuardMiddleware,
    HeadMiddleware,
    RequestContextMiddleware,
    collect_route_templates,
)
from imagegen.api.openai import probes as openai_probes
from imagegen.api.openai import routes as openai_images
from imagegen.api.openapi import install_openapi
from imagegen.api.schemas import NATIVE_ERRORS
from imagegen.backends.registry import BackendFactory
from imagegen.config import Settings, SettingsError, load_settings
from imagegen.engine.base import Engine
from imagegen.engine.jobs import Job
from imagegen.engine.store import JobStore
from imagegen.logging_setup import configure_logging
from imagegen.services import build_services
from imagegen.storage.outputs import OutputStore

log = logging.getLogger("imagegen")

PUBLIC_PATHS = ("/health", "/health/live")
#: The routes that take images: their body limit is SD_MAX_UPLOAD_BYTES (the others keep SD_MAX_BODY_BYTES).
UPLOAD_PATHS = ("/api/img2img", "/api/jobs", "/sdapi/v1/img2img", "/v1/images/edits")
#: The one route that takes multipart bodies (the OpenAI SDK posts edits as a form).
MULTIPART_PATHS = ("/v1/images/edits",)


def _install_drain_on_signal(engine: Engine) -> list[tuple[int, Any]]:
    """Stop admitting jobs the moment SIGTERM/SIGINT arrives, then hand the signal on (uvicorn's
    own handler starts the graceful shutdown). Only possible from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return []
    restored: list[tuple[int, Any]] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue

        def handler(sig: int, frame: Any, _previous: Any = previous) -> None:
            engine.begin_drain()
            _previous(sig, frame)

        signal.signal(signum, handler)
        restored.append((signum, previous))
    return restored


async def _warn_when_public(wait: float = 30.0) -> None:
    """Warn when the service listens on an address other machines can reach while no key is set.

    The addresses are read from the process's own listening sockets once the server has bound them
    (the lifespan starts before binding, and `uvicorn imagegen.main:app --host ...` gives the app no
    other way to know its address): SD_HOST alone would be wrong under uvicorn's --host."""
    deadline = time.monotonic() + wait
    addresses: list[tuple[str, int]] = []
    while time.monotonic() < deadline:
        addresses = await asyncio.to_thread(preflight.listening_addresses)
        if addresses:
            break
        await asyncio.sleep(0.1)
    public = preflight.public_addresses(addresses)
    if public:
        log.warning(
            "SECURITY: listening on %s without SD_API_KEY: anyone who can reach this port can generate images "
            "and read outputs. Set SD_API_KEY (or bind to 127.0.0.1).",
            ", ".join(public),
        )


def create_app(
    settings: Settings | None = None,
    *,
    backend_factories: dict[str, BackendFactory] | None = None,
    default_backend: str | None = None,
    store: JobStore | None = None,
) -> FastAPI:
    """Build the service. Tests pass their own Settings (and may add backends, e.g. a fake one)."""
    if settings is None:
        try:
            settings = load_settings()
        except SettingsError as error:
            raise SystemExit(f"imagegen: {error}") from None
    configure_logging(settings.log_level, settings.log_format)

    def webhook_body(job: Job, outputs: OutputStore) -> dict[str, Any]:
        return presenters.job_body(job, outputs, settings.public_url or "", queue_position=None, include_b64=True)

    services = build_services(
        settings,
        store=store,
        backend_factories=backend_factories,
        default_backend=default_backend,
        webhook_body=webhook_body,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # uvicorn's own bind error ("address already in use") becomes the message `imagegen serve` gives.
        port_hint = preflight.PortInUseHint()
        logging.getLogger("uvicorn.error").addFilter(port_hint)
        exposure = (
            asyncio.create_task(_warn_when_public(), name="public-address-check") if settings.api_key is None else None
        )
        findings = preflight.check(settings)
        for problem in findings.errors:
            log.error("START-UP: %s", problem)
        for problem in findings.warnings:
            log.warning("START-UP: %s", problem)
        await services.start()
        restored = _install_drain_on_signal(services.engine)
        log.info("imagegen %s ready to accept requests; default backend=%s", __version__, services.registry.default_id)
        try:
            yield
        finally:
            if exposure is not None:
                exposure.cancel()
            logging.getLogger("uvicorn.error").removeFilter(port_hint)
            for signum, previous in restored:
                signal.signal(signum, previous)
            await services.stop()

    app = FastAPI(
        title="imagegen",
        version=__version__,
        description="Self-hosted image generation: Stable Diffusion, FLUX (local) and the BFL FLUX API behind one API.",
        lifespan=lifespan,
        responses=NATIVE_ERRORS,
        # /docs is served by api/docs.py (local files, strict CSP), not from a CDN; no ReDoc.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.services = services
    install_error_handlers(app)
    # The browser page and its exact files are public (it must load to ask for the key); the API
    # calls it makes are not.
    assets = web.WebAssets.load()
    routers = (
        health.router,
        generate.router,
        jobs.router,
        images.router,
        loras.router,
        metrics_api.router,
        # Drop-in compatibility: the A1111 (/sdapi/v1) and OpenAI Images (/v1) dialects.
        a1111.router,
        a1111_probes.router,
        openai_images.router,
        openai_probes.router,
        web.make_router(assets, auth_required=settings.api_key is not None),
        docs.make_router(app.title, app.openapi_url or "/openapi.json"),
    )
    for router in routers:
        app.include_router(router)
    app.state.route_templates = collect_route_templates(app.router, *routers)

    public = (*PUBLIC_PATHS, *assets.public_paths, *(("/metrics",) if settings.metrics_public else ()))
    install_openapi(app, auth_required=settings.api_key is not None, public_paths=public)

    # Added innermost first: BodyGuard, then ApiKey, then CORS, then HEAD as GET, then RequestContext (outermost).
    app.add_middleware(
        BodyGuardMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
        upload_bytes=settings.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
        multipart_paths=MULTIPART_PATHS,
        allowed_origins=settings.cors_origins,
        unread_paths=a1111_probes.UNREAD_PATHS | openai_probes.UNREAD_PATHS,
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value(), public_paths=public)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            allow_credentials=False,
        )
    app.add_middleware(HeadMiddleware)
    app.add_middleware(RequestContextMiddleware)
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn imagegen.main:app` builds the app from the environment on first access only, so
    # importing this module (tests, the CLI) never reads settings or opens databases.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
