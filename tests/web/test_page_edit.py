"""The page's edit mode in Chromium: pick an image, set the strength, paint a mask with the brush, and
generate (an inpainting job over the real tiny SD pipeline); then "Use as input" puts a result back as
the next init image. Screenshots go to test-artifacts/web/."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest

from imagegen.generation import InputImage
from tests.support.editing import gradient, png_bytes

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install the 'test' extra)"
)
expect = sync_api.expect


def test_edit_mode_paints_a_mask_and_reuses_a_result(serve: Callable[..., httpx.Client], open_page) -> None:
    client = serve()  # tiny-sd: img2img and inpainting
    probe = open_page(f"{client.base_url}/")
    page = probe.page
    expect(page.locator("#backend-sd")).to_be_checked()
    edit = page.locator("#edit")
    expect(edit).to_be_visible()
    expect(page.locator("#mask-tools")).to_be_hidden()

    page.set_input_files(
        "#edit-files", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": png_bytes(gradient(64, 48))}]
    )
    expect(page.locator("#edit-images li")).to_have_count(1)
    expect(page.locator("#edit-images li")).to_contain_text("64 × 48")
    expect(page.locator("#strength-field")).to_be_visible()
    page.locator("#strength").fill("0.5")
    expect(page.locator("#strength-value")).to_have_text("0.50")

    # Paint across the right part of the image with the brush.
    canvas = page.locator("#mask-canvas")
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + 5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] - 5, steps=8)
    page.mouse.up()
    probe.screenshot("edit-mask")

    page.fill("#prompt", "a red door")
    page.fill("#steps", "8")
    page.click("#generate")
    card = page.locator(".job").first
    expect(card).to_have_attribute("data-status", "succeeded", timeout=60_000)
    expect(card.locator(".job-meta")).to_contain_text("inpaint")
    expect(card.locator(".job-state")).to_have_text(re.compile(r"^Done · 4 of 4 steps"))  # int(8 x 0.5)
    expect(card.locator(".params")).to_contain_text("inpaint · strength 0.5")
    expect(card.locator("figure.result img")).to_have_attribute("src", re.compile(r"^blob:"))
    assert card.locator("figure.result img").evaluate("img => img.naturalWidth") == 64

    job = client.get("/api/jobs", params={"limit": 1}).json()["jobs"][0]
    parameters = job["parameters"]
    assert parameters["mode"] == "inpaint" and parameters["strength"] == 0.5
    assert (parameters["width"], parameters["height"]) == (64, 48)  # the image's size, not the preset
    mask = client.app.state.services.inputs.open(InputImage(**parameters["mask"]))  # type: ignore[attr-defined]
    assert mask.getpixel((48, 24)) == 255 and mask.getpixel((8, 24)) == 0  # painted = repaint
    probe.screenshot("edit-result")

    # "Use as input": the result becomes the next init image.
    card.get_by_role("button", name="Use as input").click()
    expect(page.locator("#edit-images li")).to_have_count(1)
    expect(page.locator("#edit-images li img")).to_have_attribute("alt", re.compile(r"\.png$"))
    expect(page.locator("#edit-images li")).to_contain_text("64 × 48")
    page.get_by_role("button", name=re.compile("^Remove")).click()
    expect(page.locator("#edit-images li")).to_have_count(0)
    expect(page.locator("#mask-tools")).to_be_hidden()
    probe.assert_clean()
