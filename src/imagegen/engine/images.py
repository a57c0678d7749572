"""Storing a job's generated images: the one "store the images" step of both engines (the embedded
one and the distributed workers). Flagged images are never written; each stored file embeds the
job's parameters (storage/metadata.py) and gets a server-chosen name (storage/outputs.py). Pixels are
encoded; bytes delivered encoded in the requested format (BFL) are stored as they are, the metadata
inserted. Each `StoredImage` keeps the stored bytes for the answer (engine/results.py)."""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagegen.engine.jobs import Job
from imagegen.engine.results import StoredImage
from imagegen.generation import EncodedImage, GeneratedImage
from imagegen.storage.metadata import file_metadata
from imagegen.storage.outputs import ImageStore, SavedFile

log = logging.getLogger("imagegen.engine.images")

_encoder_executor: ThreadPoolExecutor | None = None


def _encoder_pool() -> ThreadPoolExecutor:
    global _encoder_executor
    if _encoder_executor is None:
        _encoder_executor = ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 2), thread_name_prefix="imagegen-encode"
        )
    return _encoder_executor


def store_images(outputs: ImageStore, job: Job, images: list[GeneratedImage]) -> list[StoredImage]:
    """Encode and write the job's images (blocking: call it off the event loop), in order."""
    # Encoding (zlib for PNG) releases the GIL: a batch's images are encoded side by side.
    if len(images) > 1:
        return list(_encoder_pool().map(lambda image: _store_image(outputs, job, image), images))
    return [_store_image(outputs, job, image) for image in images]


def _store_image(outputs: ImageStore, job: Job, image: GeneratedImage) -> StoredImage:
    if image.withheld:
        return StoredImage(seed=image.seed, nsfw=image.nsfw, info=dict(image.info))  # flagged: never written
    output_format = job.request.output_format
    encoded = image.encoded
    if encoded is not None and encoded.format == output_format:
        # Bytes as delivered (BFL): the metadata goes in without decoding or re-encoding them.
        meta = _meta(job, image, encoded.width, encoded.height)
        try:
            saved = outputs.save_encoded(encoded, meta)
        except ValueError:
            log.warning("job=%s the delivered %s could not take the metadata; re-encoding it", job.id, output_format)
        else:
            return _stored(image, saved, encoded.width, encoded.height)
    pixels = image.image if image.image is not None else _decode(encoded)
    meta = _meta(job, image, pixels.width, pixels.height)
    saved = outputs.save(pixels, output_format, meta)
    return _stored(image, saved, pixels.width, pixels.height)


def _meta(job: Job, image: GeneratedImage, width: int, height: int) -> dict[str, Any]:
    return file_metadata(job.request, seed=image.seed, width=width, height=height, info=image.info, job_id=job.id)


def _stored(image: GeneratedImage, saved: SavedFile, width: int, height: int) -> StoredImage:
    return StoredImage(
        seed=image.seed,
        filename=saved.name,
        mime_type=saved.mime_type,
        width=width,
        height=height,
        info=dict(image.info),
        data=saved.data,  # the answer is built from these bytes, not from a second read of the file
    )


def _decode(encoded: EncodedImage | None) -> Any:
    """Pixels of delivered bytes of another format than the one asked for (BFL sends PNG for WebP)."""
    from PIL import Image

    assert encoded is not None  # not withheld: pixels or bytes
    decoded = Image.open(io.BytesIO(encoded.data))
    decoded.load()
    return decoded


def remove_images(outputs: ImageStore, images: list[StoredImage]) -> None:
    """Delete files stored for a result that will not be used (its job was finalized by someone else)."""
    for image in images:
        if image.filename is not None:
            outputs.remove(image.filename)
