"""The `Annotated` dependency aliases routes use to reach the services of their app instance."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from imagegen.config import Settings
from imagegen.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def request_id(request: Request) -> str | None:
    value: str | None = request.scope.get("state", {}).get("request_id")
    return value


def base_url(request: Request, settings: Settings) -> str:
    """The base of the links in native answers (Location, status_url, events_url, image urls):
    SD_PUBLIC_URL, else none (links relative to the service, `/api/...`). Never the Host header: a
    caller or a proxy could put any host there, and the links would point at it."""
    return settings.public_url or ""


def absolute_base_url(request: Request, settings: Settings) -> str:
    """SD_PUBLIC_URL, else the URL the caller used: for answers whose clients need absolute URLs
    (the OpenAI dialect's `url`, which its clients fetch as is); the link goes back to that caller only."""
    return settings.public_url or str(request.base_url).rstrip("/")
