"""The page's LoRA picker in real Chromium: it lists the LoRAs that fit the chosen backend and model
(GET /api/loras), sends the checked ones with their weights, and follows a backend switch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.fake_backend import FakeBackend
from tests.support.loras import lora_folder

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect


def test_pick_loras_with_weights_and_switch_backends(
    serve: Callable[..., httpx.Client], open_page, model_dir: Path
) -> None:
    client = serve(lora_dir=lora_folder(model_dir), flux_model_id="tiny-flux2-klein", factories={"fake": FakeBackend})
    probe = open_page(f"{client.base_url}/")
    page = probe.page
    expect(page.locator("#backend-sd")).to_be_checked()
    field = page.locator("#lora-field")
    expect(field).to_be_visible()
    names = field.locator(".lora").evaluate_all("rows => rows.map(row => row.dataset.name)")
    # What may fit tiny-sd: its own LoRAs, and those whose family only loading can tell.
    assert names == ["alias", "mystery", "sd-style", "sd-unet-only", "sd-unmatched"]
    expect(page.locator("#lora-hint")).to_contain_text("Up to 4")
    row = field.locator('.lora[data-name="sd-style"]')
    row.get_by_role("checkbox", name="sd-style").check()
    row.get_by_label("Weight of sd-style").fill("0.8")
    probe.screenshot("loras")

    page.fill("#prompt", "a red fox")
    page.fill("#steps", "2")
    page.click("#generate")
    card = page.locator(".job").first
    expect(card).to_have_attribute("data-status", "succeeded", timeout=60_000)
    expect(card.locator(".params")).to_contain_text("sd-style 0.8")
    job = client.get(f"/api/jobs/{card.get_attribute('data-job-id')}").json()
    assert job["parameters"]["loras"] == [{"name": "sd-style", "weight": 0.8}]
    assert job["result"]["images"][0]["loras"][0]["name"] == "sd-style"

    # flux-local: only the klein LoRAs (and the unknown one); the sd choice is kept for later.
    page.locator("#backend-flux-local").check()
    expect(field.locator(".lora")).to_have_count(3)
    assert field.locator(".lora").evaluate_all("rows => rows.map(row => row.dataset.name)") == [
        "klein-other",
        "klein-style",
        "mystery",
    ]
    page.locator("#backend-sd").check()
    expect(field.locator('.lora[data-name="sd-style"] .lora-check')).to_be_checked()
    # A backend without LoRAs hides the picker, and sends none.
    page.locator("#backend-fake").check()
    expect(field).to_be_hidden()
    page.click("#generate")
    expect(page.locator(".job")).to_have_count(2)
    fake_card = page.locator(".job").first
    expect(fake_card).to_have_attribute("data-status", "succeeded", timeout=30_000)
    assert client.get(f"/api/jobs/{fake_card.get_attribute('data-job-id')}").json()["parameters"]["loras"] == []
    probe.assert_clean()
