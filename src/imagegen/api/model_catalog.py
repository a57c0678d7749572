"""The models clients may pick, as (backend, model) pairs, under names both compatibility dialects use.

An A1111 client picks a "checkpoint" by title and an OpenAI client sends any `model` string; both
come here. Every pair comes from the settings (SD_MODEL_ID + SD_MODELS for sd, SD_FLUX_MODEL_ID,
SD_BFL_MODEL + SD_BFL_MODELS), so a client can only ever choose among what the operator allowed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from imagegen.backends.base import ImageBackend
from imagegen.backends.registry import BackendRegistry


@dataclass(frozen=True)
class Checkpoint:
    backend: str
    model: str

    @property
    def title(self) -> str:
        # A1111 titles read "name [hash]"; here the bracket names the backend, so one model id
        # offered by two backends still gets two distinct titles.
        return f"{self.model} [{self.backend}]"

    @property
    def sha256(self) -> str:
        """A stable id of the pair (not a hash of weights: the service never reads a checkpoint file)."""
        return hashlib.sha256(f"{self.backend}:{self.model}".encode()).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]


def usable(backend: ImageBackend) -> bool:
    """Whether the backend takes jobs (the engine refuses the others): lists leave the others out."""
    return backend.availability().accepts_jobs


def checkpoints(registry: BackendRegistry, *, usable_only: bool = False) -> list[Checkpoint]:
    """Every allowed pair, the default backend's first."""
    ordered = sorted(registry, key=lambda backend: backend.id != registry.default_id)
    return [
        Checkpoint(backend.id, model)
        for backend in ordered
        if not usable_only or usable(backend)
        for model in backend.capabilities().models
    ]


def current(registry: BackendRegistry) -> Checkpoint:
    """What a request naming no backend and no model gets now."""
    backend = registry.default
    return Checkpoint(backend.id, backend.default_model_id())


def _matcher(wanted: str, fold: bool) -> Callable[[str], bool]:
    if fold:
        folded = wanted.casefold()
        return lambda value: value.casefold() == folded
    return lambda value: value == wanted


def find(registry: BackendRegistry, name: str) -> Checkpoint | None:
    """The pair a name means: a title ("tiny-sd [sd]"), a model id, a backend id (its default model),
    or a hash from sd-models; exact first, then ignoring case. None when nothing matches."""
    wanted = name.strip()
    if not wanted:
        return None
    pairs = checkpoints(registry)
    for fold in (False, True):
        same = _matcher(wanted, fold)
        for pair in pairs:
            if same(pair.title) or same(pair.short_hash) or same(pair.sha256):
                return pair
        for pair in pairs:  # the default backend's first: a model id on two backends means the default's
            if same(pair.model):
                return pair
        for backend in registry:
            if same(backend.id):
                return Checkpoint(backend.id, backend.default_model_id())
    return None
