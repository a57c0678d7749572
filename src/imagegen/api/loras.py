"""GET /api/loras: the LoRA adapters in SD_LORA_DIR, with the family each fits (read from the
file's tensor names), size, SHA-256, and the configured (backend, model) pairs it can go on."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from imagegen.api.deps import ServicesDep
from imagegen.api.schemas import LoraList
from imagegen.backends.registry import BackendRegistry
from imagegen.storage.loras import LoraFile

router = APIRouter(tags=["loras"])


def fits(registry: BackendRegistry, entry: LoraFile) -> list[dict[str, str]]:
    """The configured (backend, model) pairs this LoRA fits, or may fit where the model's family is
    not known before it is loaded (loading checks it)."""
    pairs: list[dict[str, str]] = []
    for backend in registry:
        capabilities = backend.capabilities()
        if not capabilities.supports_loras:
            continue
        for model in capabilities.models:
            if entry.header.family.fits(backend.lora_family(model)) is not False:
                pairs.append({"backend": backend.id, "model": model})
    return pairs


def listing(registry: BackendRegistry) -> list[dict[str, Any]]:
    """Every LoRA with its hash (computed once per file version: call off the event loop)."""
    catalog = registry.loras
    if catalog is None:
        return []
    return [
        {**entry.to_dict(), "sha256": catalog.sha256(entry), "fits": fits(registry, entry)} for entry in catalog.list()
    ]


@router.get("/api/loras", response_model=LoraList)
async def list_loras(services: ServicesDep) -> dict[str, Any]:
    """The LoRAs requests may name (`loras: [{"name", "weight"}]`), by name."""
    return {"loras": await asyncio.to_thread(listing, services.registry)}
