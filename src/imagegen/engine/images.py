"""Storing a job's generated images: the one "store the images" step of both engines (the embedded
one and the distributed workers). Flagged images are never written; each stored file embeds the
job's parameters (storage/metadata.py) and gets a server-chosen name (storage/outputs.py)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from imagegen.engine.jobs import Job
from imagegen.engine.results import StoredImage
from imagegen.generation import GeneratedImage
from imagegen.storage.metadata import file_metadata
from imagegen.storage.outputs import ImageStore

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
    if image.nsfw or image.image is None:
        return StoredImage(seed=image.seed, nsfw=image.nsfw, info=dict(image.info))  # flagged: never written
    width, height = image.image.width, image.image.height
    meta = file_metadata(job.request, seed=image.seed, width=width, height=height, info=image.info, job_id=job.id)
    saved = outputs.save(image.image, job.request.output_format, meta)
    return StoredImage(
        seed=image.seed,
        filename=saved.name,
        mime_type=saved.mime_type,
        width=width,
        height=height,
        info=dict(image.info),
    )


def remove_images(outputs: ImageStore, images: list[StoredImage]) -> None:
    """Delete files stored for a result that will not be used (its job was finalized by someone else)."""
    for image in images:
        if image.filename is not None:
            outputs.remove(image.filename)
