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
    """Where image and job links point: SD_PUBLIC_URL, else the URL the caller used."""
    return settings.public_url or str(request.base_url).rstrip("/")
