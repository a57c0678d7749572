"""The services of one app instance and the `Annotated` dependency aliases routes use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from imagegen.backends.registry import BackendRegistry
from imagegen.config import Settings
from imagegen.engine.engine import JobEngine
from imagegen.engine.events import JobEvents
from imagegen.engine.store import JobStore
from imagegen.storage.disk_usage import DiskUsage
from imagegen.storage.outputs import OutputStore


@dataclass
class Services:
    settings: Settings
    registry: BackendRegistry
    store: JobStore
    outputs: OutputStore
    events: JobEvents
    engine: JobEngine
    #: sizes of the model and output folders, measured in the background (for /info and /metrics)
    disk: DiskUsage | None = None


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def base_url(request: Request, settings: Settings) -> str:
    """Where image and job links point: SD_PUBLIC_URL, else the URL the caller used."""
    return settings.public_url or str(request.base_url).rstrip("/")
