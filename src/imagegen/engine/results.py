"""What a succeeded job produced: its images as stored (`StoredImage`) and its timings.

Every consumer (the API's presenters and dialects, the CLI, metrics, webhooks) asks a `JobResult`
which images were delivered and which were flagged, instead of re-reading untyped keys. A result
names files, never URLs: where an image is served from is the API layer's business.

Persisted as JSON in the job store: `to_dict()` writes the shape stored since the first release
({"images": [{"seed", "nsfw", "filename", "mime_type", "width", "height", <backend info>...}],
"timings": {...}}), and `from_dict()` also reads older rows, which carry a `url` key as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Keys of a stored image that are not backend info (`url`: written by releases before this module).
_IMAGE_KEYS = frozenset({"seed", "nsfw", "filename", "url", "mime_type", "width", "height"})


@dataclass(frozen=True)
class StoredImage:
    """One image of a job: a file in the output store, or a flagged image that was never written."""

    seed: int
    nsfw: bool = False
    #: The output store's name for the file; None when the image was not stored (flagged).
    filename: str | None = None
    mime_type: str | None = None
    width: int | None = None
    height: int | None = None
    #: What the backend reported about this image (BFL: bfl_task_id, bfl_seed, bfl_cost).
    info: dict[str, Any] = field(default_factory=dict)
    #: The stored file's bytes, kept from the encoder for the answer (no second read of the file). Only
    #: in memory, on the result object the engine hands the waiting route and the webhook: never
    #: persisted (`to_dict` leaves it out), so it lives as long as that answer is being built. None
    #: on a result read back from the job store: the file is read then.
    data: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.nsfw and self.filename is not None:
            raise ValueError("a flagged image is never stored: it cannot have a filename")

    @property
    def delivered(self) -> bool:
        """Stored and returnable; otherwise flagged (no content is ever returned for it)."""
        return self.filename is not None

    def to_dict(self) -> dict[str, Any]:
        item: dict[str, Any] = {"seed": self.seed, "nsfw": self.nsfw, **self.info}
        item.update(filename=self.filename, mime_type=self.mime_type)
        # A flagged image has no size (no pixels): the key is absent, as it always was.
        if self.width is not None:
            item["width"] = self.width
        if self.height is not None:
            item["height"] = self.height
        return item

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoredImage:
        return cls(
            seed=int(data["seed"]),
            nsfw=bool(data.get("nsfw", False)),
            filename=data.get("filename"),
            mime_type=data.get("mime_type"),
            width=data.get("width"),
            height=data.get("height"),
            info={key: value for key, value in data.items() if key not in _IMAGE_KEYS},
        )


@dataclass(frozen=True)
class Timings:
    #: From submission to the start of the job's pipeline call.
    queued_ms: float
    #: The pipeline call (or BFL task) the job was part of.
    generation_ms: float
    #: Jobs merged into that call.
    batch_size: int

    def to_dict(self) -> dict[str, float]:
        return {"queued_ms": self.queued_ms, "generation_ms": self.generation_ms, "batch_size": self.batch_size}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timings:
        return cls(
            queued_ms=data["queued_ms"],
            generation_ms=data["generation_ms"],
            batch_size=int(data["batch_size"]),
        )


@dataclass(frozen=True)
class JobResult:
    """The result of a succeeded job (no pixels: those live in the output store)."""

    images: list[StoredImage]
    timings: Timings

    def delivered(self) -> list[StoredImage]:
        """The images stored and returned to the caller, in order."""
        return [image for image in self.images if image.delivered]

    def flagged(self) -> list[StoredImage]:
        """The images the safety checker withheld, in order."""
        return [image for image in self.images if not image.delivered]

    def to_dict(self) -> dict[str, Any]:
        return {"images": [image.to_dict() for image in self.images], "timings": self.timings.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobResult:
        return cls(
            images=[StoredImage.from_dict(item) for item in data.get("images", [])],
            timings=Timings.from_dict(data["timings"]),
        )
