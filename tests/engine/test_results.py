"""Typed job results: which images were delivered and which flagged, the JSON they persist as, rows
written before `JobResult` existed (with their `url` key) loading from a real SQLite store and served
with URLs the API builds, and the engine never storing a flagged image or an HTTP path."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imagegen.config import Settings
from imagegen.engine.jobs import Job, JobStatus, new_job_id
from imagegen.engine.results import JobResult, StoredImage, Timings
from imagegen.engine.store import SQLiteJobStore
from imagegen.generation import GenerationRequest
from imagegen.storage.metadata import read_metadata
from imagegen.storage.outputs import OutputStore

TIMINGS = Timings(queued_ms=0.4, generation_ms=12.5, batch_size=2)


def stored(seed: int, name: str | None, **info: Any) -> StoredImage:
    if name is None:
        return StoredImage(seed=seed, nsfw=True, info=info)
    return StoredImage(seed=seed, filename=name, mime_type="image/png", width=32, height=24, info=info)


def request(**overrides: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "backend": "fake",
        "model": "fake-model",
        "prompt": "a lighthouse",
        "negative_prompt": None,
        "width": 32,
        "height": 24,
        "steps": 4,
        "guidance_scale": None,
        "scheduler": None,
        "seeds": (7, 8, 9),
        "output_format": "png",
    }
    values.update(overrides)
    return GenerationRequest(**values)


def test_delivered_and_flagged_split_the_images_in_order() -> None:
    first, flagged, last = stored(7, "a.png"), stored(8, None), stored(9, "c.png")
    result = JobResult(images=[first, flagged, last], timings=TIMINGS)
    assert result.delivered() == [first, last]
    assert result.flagged() == [flagged]
    assert [image.delivered for image in result.images] == [True, False, True]
    everything_flagged = JobResult(images=[stored(1, None), stored(2, None)], timings=TIMINGS)
    assert everything_flagged.delivered() == [] and len(everything_flagged.flagged()) == 2


def test_a_flagged_image_never_has_a_filename() -> None:
    with pytest.raises(ValueError, match="flagged"):
        StoredImage(seed=1, nsfw=True, filename="20260101-000000-0123456789ab.png")
    assert StoredImage(seed=1, nsfw=True).filename is None


def test_round_trip_keeps_every_field_and_the_backends_info() -> None:
    result = JobResult(
        images=[stored(7, "a.png", bfl_task_id="task-1", bfl_seed=7, bfl_cost=1.5), stored(8, None)],
        timings=TIMINGS,
    )
    data = result.to_dict()
    # The persisted shape: backend info flat beside the image's own keys; a flagged image has no size.
    assert data["images"][0] == {
        "seed": 7,
        "nsfw": False,
        "bfl_task_id": "task-1",
        "bfl_seed": 7,
        "bfl_cost": 1.5,
        "filename": "a.png",
        "mime_type": "image/png",
        "width": 32,
        "height": 24,
    }
    assert data["images"][1] == {"seed": 8, "nsfw": True, "filename": None, "mime_type": None}
    assert data["timings"] == {"queued_ms": 0.4, "generation_ms": 12.5, "batch_size": 2}
    assert "url" not in json.dumps(data)  # results name files; URLs are the API's business
    assert JobResult.from_dict(json.loads(json.dumps(data))) == result


def _old_row_result(name: str) -> str:
    """The `result` column exactly as the engine wrote it before JobResult (keys sorted, a `url`)."""
    old = {
        "images": [
            {
                "bfl_seed": 7,
                "bfl_task_id": "task-1",
                "filename": name,
                "height": 24,
                "mime_type": "image/png",
                "nsfw": False,
                "seed": 7,
                "url": f"/api/images/{name}",
                "width": 32,
            },
            {"filename": None, "mime_type": None, "nsfw": True, "seed": 8, "url": None},
        ],
        "timings": {"batch_size": 1, "generation_ms": 12.5, "queued_ms": 0.4},
    }
    return json.dumps(old, separators=(",", ":"), sort_keys=True)


def _insert_old_job(db: Path, name: str) -> str:
    store = SQLiteJobStore(db)
    job = Job(id=new_job_id(), request=request(seeds=(7, 8)), status=JobStatus.SUCCEEDED)
    job.started_at = job.created_at
    job.finished_at = time.time()
    store.add(job)
    store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE jobs SET result=? WHERE id=?", (_old_row_result(name), job.id))
    return job.id


def test_an_old_row_loads_from_a_real_sqlite_store(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    job_id = _insert_old_job(db, "20260101-000000-0123456789ab.png")
    store = SQLiteJobStore(db)
    try:
        loaded = store.get(job_id)
        assert loaded is not None and loaded.result is not None
        (delivered,) = loaded.result.delivered()
        (flagged,) = loaded.result.flagged()
        assert delivered == StoredImage(
            seed=7,
            filename="20260101-000000-0123456789ab.png",
            mime_type="image/png",
            width=32,
            height=24,
            info={"bfl_seed": 7, "bfl_task_id": "task-1"},  # the old `url` is not backend info
        )
        assert flagged == StoredImage(seed=8, nsfw=True)
        assert loaded.result.timings == Timings(queued_ms=0.4, generation_ms=12.5, batch_size=1)
        # Written back, the row drops the old url and keeps everything else.
        store.update(loaded)
        again = store.get(job_id)
        assert again is not None and again.result == loaded.result
    finally:
        store.close()


def test_an_old_row_is_served_with_urls_the_api_builds(
    serve: Callable[..., httpx.Client], make_settings: Callable[..., Settings], fake_factory
) -> None:
    settings = make_settings()
    saved = OutputStore(settings.output_dir).save(Image.new("RGB", (32, 24), (9, 8, 7)), "png", {"seed": 7})
    job_id = _insert_old_job(settings.data_dir / "jobs.sqlite3", saved.name)
    factories, _ = fake_factory()
    client = serve(settings, factories=factories, default_backend="fake")

    response = client.get(f"/api/jobs/{job_id}")
    assert response.status_code == 200, response.text
    delivered, flagged = response.json()["result"]["images"]
    assert delivered["url"] == f"/api/images/{saved.name}"  # relative without SD_PUBLIC_URL
    assert base64.b64decode(delivered["b64"]) == saved.data
    assert delivered["bfl_task_id"] == "task-1" and delivered["seed"] == 7
    assert flagged["url"] is None and flagged["b64"] is None and flagged["filename"] is None
    assert response.json()["result"]["timings"] == {"batch_size": 1, "generation_ms": 12.5, "queued_ms": 0.4}


def test_the_engine_stores_files_not_urls_and_never_a_flagged_image(
    serve: Callable[..., httpx.Client], make_settings: Callable[..., Settings], fake_factory
) -> None:
    settings = make_settings()
    factories, _ = fake_factory()
    client = serve(settings, factories=factories, default_backend="fake")
    kept = client.post("/api/jobs", json={"prompt": "two cats", "num_images": 2, "seed": 5}).json()["id"]
    withheld = client.post("/api/jobs", json={"prompt": "nsfw cat", "seed": 6}).json()["id"]
    for job_id in (kept, withheld):
        deadline = time.monotonic() + 30
        while client.get(f"/api/jobs/{job_id}", params={"include_images": "false"}).json()["status"] != "succeeded":
            assert time.monotonic() < deadline, f"job {job_id} did not succeed"
            time.sleep(0.02)

    with sqlite3.connect(settings.data_dir / "jobs.sqlite3") as conn:
        rows = dict(conn.execute("SELECT id, result FROM jobs WHERE id IN (?, ?)", (kept, withheld)).fetchall())
    assert "url" not in rows[kept] and "url" not in rows[withheld]  # no HTTP path in the engine's record

    result = JobResult.from_dict(json.loads(rows[kept]))
    assert [image.seed for image in result.delivered()] == [5, 6] and result.flagged() == []
    files = {path.name for path in Path(settings.output_dir).iterdir() if not path.name.startswith(".")}
    assert {image.filename for image in result.delivered()} == files
    # The metadata storage wrote into each file: the request, this image's seed and size, the job.
    for image in result.delivered():
        assert image.filename is not None
        meta = read_metadata(Path(settings.output_dir) / image.filename)["imagegen"]
        assert meta["seed"] == image.seed and meta["job_id"] == kept and meta["prompt"] == "two cats"
        assert (meta["width"], meta["height"]) == (image.width, image.height)

    flagged = JobResult.from_dict(json.loads(rows[withheld]))
    assert flagged.delivered() == [] and [image.seed for image in flagged.flagged()] == [6]
    assert all(image.nsfw and image.filename is None for image in flagged.flagged())
    assert len(files) == 2  # the flagged image was never written
