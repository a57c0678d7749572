"""GET /api/images (paged, newest first, with metadata), DELETE /api/images/{name}, disk usage in
/info, and the retention task of a running service. Real HTTP, real files."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.outputs import DAY, make_output, output_name
from tests.support.scrape import delta, scrape


@pytest.fixture
def client(serve: Callable[..., httpx.Client], fake_factory) -> httpx.Client:  # type: ignore[no-untyped-def]
    factories, _ = fake_factory()
    return serve(factories=factories, default_backend="fake")


def _generate(client: httpx.Client, seed: int) -> str:
    response = client.post("/api/txt2img", json={"prompt": f"a fox number {seed}", "seed": seed})
    assert response.status_code == 200
    return response.json()["images"][0]["filename"]


def test_list_is_paged_newest_first_with_metadata(client: httpx.Client) -> None:
    names = [_generate(client, seed) for seed in range(3)]
    first = client.get("/api/images", params={"limit": 2})
    assert first.status_code == 200
    body = first.json()
    listed = [item["name"] for item in body["images"]]
    assert listed == sorted(names, reverse=True)[:2]
    assert body["next_before"] == listed[-1]
    item = body["images"][0]
    assert item["url"].endswith(f"/api/images/{item['name']}") and item["mime_type"] == "image/png"
    assert item["size_bytes"] > 0 and item["created_at"].endswith("Z")
    assert item["metadata"]["backend"] == "fake" and item["metadata"]["prompt"].startswith("a fox number")
    assert "Seed: " in item["parameters"]
    rest = client.get("/api/images", params={"limit": 2, "before": body["next_before"]}).json()
    assert [entry["name"] for entry in rest["images"]] == sorted(names, reverse=True)[2:]
    assert rest["next_before"] is None
    bare = client.get("/api/images", params={"include_metadata": "false"}).json()["images"][0]
    assert bare["metadata"] is None and bare["parameters"] is None


def test_list_skips_what_is_not_a_stored_output(client: httpx.Client, tmp_path: Path) -> None:
    root = client.app.state.services.outputs.root  # type: ignore[attr-defined]
    kept = _generate(client, 1)
    (root / ".tmp-partial").write_bytes(b"half")
    (root / "notes.txt").write_text("hello")
    outside = make_output(tmp_path, "secret.png")
    os.symlink(outside, root / output_name(99))
    assert [item["name"] for item in client.get("/api/images").json()["images"]] == [kept]


@pytest.mark.parametrize("before", ["../etc/passwd", "x", "20260101-000000-abc.png", "a" * 300])
def test_bad_cursor_is_a_422_in_the_envelope(client: httpx.Client, before: str) -> None:
    response = client.get("/api/images", params={"before": before})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "before" and before not in error["message"]


def test_delete_removes_one_image_and_counts_it(client: httpx.Client) -> None:
    name = _generate(client, 5)
    job_id = client.get("/api/jobs").json()["jobs"][0]["id"]
    before = scrape(client)
    response = client.delete(f"/api/images/{name}")
    assert response.status_code == 204 and response.content == b""
    assert client.get(f"/api/images/{name}").status_code == 404
    assert client.delete(f"/api/images/{name}").status_code == 404
    # The job record stays; its image data now reads as null.
    image = client.get(f"/api/jobs/{job_id}").json()["result"]["images"][0]
    assert image["filename"] == name and image["b64"] is None
    after = scrape(client)
    assert delta(before, after, "imagegen_outputs_deleted_total", reason="request") == 1
    assert (
        delta(before, after, "imagegen_http_requests_total", route="/api/images/{name}", method="DELETE", status="204")
        == 1
    )


TRAVERSAL = [
    "..%2fsecret.png",
    "%2e%2e%2fsecret.png",
    "secret.png",
    "..",
    "20260101-000000-ABCDEFABCDEF.png",
    "20260101-000000-abcdefabcdef.png%00.txt",
    "%2Fetc%2Fpasswd",
]


@pytest.mark.parametrize("name", TRAVERSAL)
def test_delete_never_leaves_the_folder(client: httpx.Client, name: str) -> None:
    root = client.app.state.services.outputs.root  # type: ignore[attr-defined]
    secret = root.parent / "secret.png"
    secret.write_bytes(b"not yours")
    response = client.delete(f"/api/images/{name}")
    assert response.status_code in (404, 405)
    assert response.json()["error"]["type"] in ("not_found", "method_not_allowed")
    assert secret.exists()


def test_delete_does_not_go_through_symlinks(client: httpx.Client, tmp_path: Path) -> None:
    root = client.app.state.services.outputs.root  # type: ignore[attr-defined]
    outside = make_output(tmp_path, "outside.png")
    link_out = root / output_name(1)
    os.symlink(outside, link_out)
    target = _generate(client, 2)
    link_in = root / output_name(3)
    os.symlink(root / target, link_in)
    for link in (link_out, link_in):
        assert client.delete(f"/api/images/{link.name}").status_code == 404
        assert link.is_symlink()
    assert outside.exists() and (root / target).exists()


def test_delete_needs_the_key(serve: Callable[..., httpx.Client], fake_factory) -> None:  # type: ignore[no-untyped-def]
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake", api_key="k-1", headers={"X-API-Key": "k-1"})
    name = _generate(client, 1)
    assert client.delete(f"/api/images/{name}", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get(f"/api/images/{name}").status_code == 200
    assert client.get("/api/images", headers={"X-API-Key": "wrong"}).status_code == 401


def test_info_shows_disk_usage_without_waiting_for_it(client: httpx.Client) -> None:
    _generate(client, 1)
    started = time.perf_counter()
    disk = client.get("/info").json()["disk"]
    assert time.perf_counter() - started < 2
    assert set(disk["folders"]) == {"models", "outputs"}
    deadline = time.monotonic() + 10
    while disk["measured_at"] is None or disk["folders"]["outputs"]["files"] == 0:
        assert time.monotonic() < deadline
        client.app.state.services.disk.refresh_in_background()  # type: ignore[attr-defined]
        time.sleep(0.05)
        disk = client.get("/info").json()["disk"]
    outputs = disk["folders"]["outputs"]
    assert outputs["files"] >= 1 and outputs["bytes"] > 0 and outputs["free_bytes"] > 0
    assert disk["age_seconds"] >= 0


def test_the_service_prunes_at_start_up_and_counts_it(
    serve: Callable[..., httpx.Client],
    fake_factory,
    make_settings,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    settings = make_settings(output_retention_days=7, output_max_gb=0.000002, output_prune_interval=3600)
    old = make_output(settings.output_dir, output_name(1), size=10, age=30 * DAY)
    big = make_output(settings.output_dir, output_name(2), size=2500, age=2 * DAY)
    small = make_output(settings.output_dir, output_name(3), size=500, age=1 * DAY)
    in_progress = make_output(settings.output_dir, ".tmp-writing", size=5000, age=30 * DAY)
    factories, _ = fake_factory()
    client = serve(settings, factories=factories, default_backend="fake")
    deadline = time.monotonic() + 10
    while old.exists() or big.exists():
        assert time.monotonic() < deadline, "the start-up retention pass did not run"
        time.sleep(0.02)
    assert small.exists() and in_progress.exists()
    info = client.get("/info").json()["retention"]
    assert info == {"days": 7.0, "max_gb": 0.000002, "interval_seconds": 3600.0}
    samples = scrape(client)
    assert samples[("imagegen_outputs_deleted_total", frozenset({("reason", "age")}))] >= 1
    assert samples[("imagegen_outputs_deleted_bytes_total", frozenset({("reason", "size")}))] >= 2500
