"""The page people keep open all day, end to end in Chromium: live previews with an ETA, "use these
settings" on results and gallery images, settings read from a dropped image (this service's or A1111's),
a form that survives a reload, the model picker, the gallery's prompt filter and delete, and the
Generate button in view at 1280x900 and on a phone. Screenshots go to test-artifacts/web/."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.web.test_page import generate, url

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install the 'test' extra)"
)
expect = sync_api.expect


@pytest.fixture
def fake_server(serve: Callable[..., httpx.Client], fake_factory) -> Callable[..., httpx.Client]:  # type: ignore[no-untyped-def]
    """The service with the deterministic fake backend as default (it sends live previews too)."""

    def start(step_delay: float = 0.005, **settings: Any) -> httpx.Client:
        factories, _ = fake_factory(step_delay=step_delay)
        return serve(factories=factories, default_backend="fake", **settings)

    return start


def form_values(page: Any) -> dict[str, str]:
    ids = ("prompt", "negative-prompt", "size", "width", "height", "steps", "guidance", "scheduler", "seed", "model")
    values = {name: page.locator(f"#{name}").input_value() for name in ids}
    values["backend"] = page.locator("input[name=backend]:checked").get_attribute("value")
    return values


def in_view(page: Any, selector: str) -> bool:
    """Whether the element is inside the window and on top at its centre (not under something)."""
    return bool(
        page.evaluate(
            """(selector) => {
                const element = document.querySelector(selector);
                const box = element.getBoundingClientRect();
                if (box.top < 0 || box.left < 0 || box.bottom > innerHeight || box.right > innerWidth) return false;
                return document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2) === element;
            }""",
            selector,
        )
    )


@pytest.mark.parametrize(
    ("name", "viewport", "mobile"),
    [("desktop", {"width": 1280, "height": 900}, False), ("phone", {"width": 390, "height": 844}, True)],
)
def test_generate_is_in_view_without_scrolling(fake_server, open_page, name, viewport, mobile) -> None:  # type: ignore[no-untyped-def]
    client = fake_server()
    probe = open_page(url(client), viewport=viewport, is_mobile=mobile, has_touch=mobile)
    page = probe.page
    expect(page.locator("#generate")).to_be_enabled()
    assert page.evaluate("scrollY") == 0
    assert in_view(page, "#generate")
    page.screenshot(path=str(probe.screenshot(f"first-screen-{name}").with_name(f"first-screen-{name}-window.png")))
    # Typed and sent without scrolling: Enter in the prompt, or a click on the button where it is.
    page.fill("#prompt", "a fox in view")
    page.click("#generate")
    expect(page.locator(".job")).to_have_count(1)
    probe.assert_clean()


def test_live_preview_with_eta_then_the_image(fake_server, open_page) -> None:  # type: ignore[no-untyped-def]
    client = fake_server(step_delay=0.04, preview_interval=0.2)  # "slow": 0.4 s a step
    probe = open_page(url(client))
    page = probe.page
    probe.record_texts(".job-state")
    card = generate(page, "a slow lighthouse", steps="8")
    preview = card.locator("figure.preview")
    expect(preview).to_be_visible(timeout=15_000)
    image = preview.locator("img.live-preview")
    expect(image).to_have_attribute("src", re.compile(r"^blob:"))
    expect(preview.locator(".preview-caption")).to_have_text(re.compile(r"^Preview at step [1-7] of 8$"))
    assert image.evaluate("img => img.complete && img.naturalWidth") == 8  # the fake's previews: 1/8 of 64 px
    expect(card.locator(".job-state")).to_have_text(
        re.compile(r"^Step \d of 8 · (about \d+ s|less than a second) left$")
    )
    probe.screenshot("live-preview")
    expect(card).to_have_attribute("data-status", "succeeded", timeout=30_000)
    expect(card.locator("figure.preview")).to_have_count(0)  # the image itself replaces it
    expect(card.locator("figure.result img")).to_have_attribute("src", re.compile(r"^blob:"))
    assert any("left" in text for text in probe.seen_texts())
    probe.assert_clean()


def test_use_these_settings_from_a_result_and_from_the_gallery(fake_server, open_page) -> None:  # type: ignore[no-untyped-def]
    client = fake_server()
    probe = open_page(url(client))
    page = probe.page
    page.fill("#negative-prompt", "blurry")
    page.select_option("#size", "custom")
    page.fill("#width", "96")
    page.fill("#height", "48")
    page.fill("#guidance", "6.5")
    page.select_option("#scheduler", "euler")
    card = generate(page, "the settings to reuse", seed="1234", steps="3")
    expect(card).to_have_attribute("data-status", "succeeded")

    # Something else in the form, then "Use these settings" brings everything back.
    for field, value in {"prompt": "other", "negative-prompt": "", "steps": "9", "guidance": "2", "seed": ""}.items():
        page.fill(f"#{field}", value)
    page.select_option("#size", "64x64")
    page.select_option("#scheduler", "default")
    card.get_by_role("button", name="Use these settings").click()
    wanted = {
        "prompt": "the settings to reuse",
        "negative-prompt": "blurry",
        "size": "custom",
        "width": "96",
        "height": "48",
        "steps": "3",
        "guidance": "6.5",
        "scheduler": "euler",
        "seed": "1234",
        "model": "fake-model",
        "backend": "fake",
    }
    assert form_values(page) == wanted
    expect(page.locator("#read-image-status")).to_have_text("Settings from the image with seed 1234.")
    expect(page.locator("#prompt")).to_be_focused()

    page.fill("#prompt", "changed again")
    page.locator("#gallery-grid li").first.get_by_role("button").click()
    page.locator("#viewer").get_by_role("button", name="Use these settings").click()
    expect(page.locator("#viewer")).to_be_hidden()
    assert form_values(page) == wanted
    probe.assert_clean()


def _png_with(text: dict[str, str], size: tuple[int, int] = (16, 16)) -> bytes:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 40, 10)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _drop(page: Any, name: str, data: bytes, mime: str) -> None:
    """Drop a file on the page the way a browser does (dragenter, dragover, drop with a DataTransfer)."""
    transfer = page.evaluate_handle(
        """([name, b64, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            return transfer;
        }""",
        [name, base64.b64encode(data).decode(), mime],
    )
    for event in ("dragenter", "dragover"):
        page.dispatch_event("main", event, {"dataTransfer": transfer})
    expect(page.locator("#drop-overlay")).to_be_visible()
    page.dispatch_event("main", "drop", {"dataTransfer": transfer})
    expect(page.locator("#drop-overlay")).to_be_hidden()


def test_settings_read_from_dropped_and_chosen_images(fake_server, open_page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = fake_server()
    made = client.post(
        "/api/txt2img",
        json={
            "prompt": "made here",
            "negative_prompt": "ugly",
            "seed": 77,
            "steps": 5,
            "width": 128,
            "height": 64,
            "guidance_scale": 3.5,
            "scheduler": "euler",
            "output_format": "webp",
        },
    ).json()
    ours = base64.b64decode(made["images"][0]["b64"])
    probe = open_page(url(client))
    page = probe.page
    expect(page.locator("#generate")).to_be_enabled()

    # This service's WebP (the JSON in its XMP packet), chosen with the button.
    (tmp_path / "ours.webp").write_bytes(ours)
    page.set_input_files("#image-file", str(tmp_path / "ours.webp"))
    expect(page.locator("#read-image-status")).to_have_text("Settings from ours.webp.")
    values = form_values(page)
    assert (values["prompt"], values["negative-prompt"], values["seed"], values["steps"]) == (
        "made here",
        "ugly",
        "77",
        "5",
    )
    # 128x64 is no preset of a 64x64 model (presets keep its pixel count): the custom size.
    assert (values["size"], values["width"], values["height"]) == ("custom", "128", "64")
    assert (values["guidance"], values["scheduler"]) == ("3.5", "euler")

    # A1111's PNG ("parameters" text), dropped on the page: its sampler maps onto a scheduler; its model and
    # schedule are not offered here, and the page says so.
    a1111 = (
        "masterpiece, a cat on a roof\nNegative prompt: lowres\nSteps: 12, Sampler: Euler, Schedule type: Karras, "
        "CFG scale: 6, Seed: 424242, Size: 64x64, Model: v1-5-pruned, Version: v1.10.1"
    )
    _drop(page, "a1111.png", _png_with({"parameters": a1111}), "image/png")
    expect(page.locator("#read-image-status")).to_have_text(
        "Settings from a1111.png (not available here: model v1-5-pruned, scheduler euler_karras)."
    )
    values = form_values(page)
    assert (values["prompt"], values["negative-prompt"], values["seed"]) == (
        "masterpiece, a cat on a roof",
        "lowres",
        "424242",
    )
    assert (values["steps"], values["guidance"], values["size"]) == ("12", "6", "64x64")
    probe.screenshot("settings-from-a1111-png")

    # A PNG without settings changes nothing and says why.
    _drop(page, "plain.png", _png_with({}), "image/png")
    expect(page.locator("#read-image-status")).to_contain_text("plain.png carries no generation settings")
    assert form_values(page)["prompt"] == "masterpiece, a cat on a roof"
    probe.assert_clean()


def test_the_form_survives_a_reload(fake_server, open_page) -> None:  # type: ignore[no-untyped-def]
    client = fake_server()
    probe = open_page(url(client))
    page = probe.page
    expect(page.locator("#generate")).to_be_enabled()
    page.fill("#prompt", "kept across reloads")
    page.fill("#negative-prompt", "nothing blurry")
    page.select_option("#size", "custom")
    page.fill("#width", "72")
    page.fill("#height", "40")
    page.fill("#steps", "11")
    page.select_option("#scheduler", "euler")
    page.fill("#seed", "99")
    before = form_values(page)
    page.wait_for_function("() => JSON.parse(localStorage.getItem('imagegen.form') || '{}').seed === '99'")
    page.reload()
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#prompt")).to_have_value("kept across reloads")
    assert form_values(page) == before
    probe.assert_clean()


def test_model_picker_follows_the_chosen_model(serve: Callable[..., httpx.Client], open_page) -> None:  # type: ignore[no-untyped-def]
    client = serve(models=["tiny-sdxl"])  # sd offers tiny-sd (default) and tiny-sdxl
    probe = open_page(url(client))
    page = probe.page
    expect(page.locator("#model-field")).to_be_visible()
    expect(page.locator("#model option")).to_have_text(["tiny-sd", "tiny-sdxl"])
    expect(page.locator("#model")).to_have_value("tiny-sd")
    expect(page.locator("#steps")).to_have_value("25")
    expect(page.locator("#guidance")).to_have_value("7.5")
    page.select_option("#model", "tiny-sdxl")  # SDXL's defaults (its capabilities from /api/backends)
    expect(page.locator("#steps")).to_have_value("30")
    expect(page.locator("#guidance")).to_have_value("5")
    requests: list[Any] = []
    page.on("request", lambda request: requests.append(request) if request.url.endswith("/api/jobs") else None)
    card = generate(page, "an sdxl fox", steps="2")
    assert requests[0].post_data_json["model"] == "tiny-sdxl"
    expect(card).to_have_attribute("data-status", "succeeded", timeout=60_000)
    expect(card.locator(".params")).to_contain_text("sd · tiny-sdxl")
    probe.screenshot("model-picker")
    probe.assert_clean()


def test_gallery_filter_and_delete_with_confirmation(fake_server, open_page) -> None:  # type: ignore[no-untyped-def]
    client = fake_server()
    names = {}
    for prompt in ("a red fox", "a blue castle", "a RED car"):
        names[prompt] = client.post("/api/txt2img", json={"prompt": prompt}).json()["images"][0]["filename"]
    probe = open_page(url(client))
    page = probe.page
    tiles = page.locator("#gallery-grid li")
    expect(tiles).to_have_count(3)
    page.fill("#gallery-filter", "red")
    expect(tiles).to_have_count(2)
    expect(page.locator("#gallery-status")).to_have_text("Page 1: 2 images, newest first, filtered by prompt.")
    page.fill("#gallery-filter", "no such prompt")
    expect(tiles).to_have_count(0)
    expect(page.locator("#gallery-status")).to_have_text("No image's prompt contains that text.")
    page.fill("#gallery-filter", "")
    expect(tiles).to_have_count(3)

    target = page.locator(f'#gallery-grid li[data-filename="{names["a blue castle"]}"]')
    target.get_by_role("button").click()
    page.locator("#viewer").get_by_role("button", name="Delete").click()
    confirm = page.locator("#confirm-delete")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text(names["a blue castle"])
    probe.screenshot("gallery-confirm-delete")
    confirm.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    assert client.get(f"/api/images/{names['a blue castle']}").status_code == 200  # kept

    page.locator("#viewer").get_by_role("button", name="Delete").click()
    confirm.get_by_role("button", name="Delete").click()
    expect(page.locator("#viewer")).to_be_hidden()
    expect(tiles).to_have_count(2)
    assert client.get(f"/api/images/{names['a blue castle']}").status_code == 404
    page.click("#gallery-refresh")  # the job record stays; its deleted image is not shown
    expect(tiles).to_have_count(2)
    probe.screenshot("gallery-after-delete")
    # The only errors are the browser's own lines for the 404 of the deleted image on refresh.
    assert all("404" in error for error in probe.errors), probe.errors


def test_phone_with_a_preview_and_the_new_controls(fake_server, open_page) -> None:  # type: ignore[no-untyped-def]
    client = fake_server(step_delay=0.04, preview_interval=0.2)
    probe = open_page(url(client), viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = probe.page
    expect(page.locator("#read-image")).to_be_visible()
    card = generate(page, "a slow phone fox", steps="10")
    expect(card.locator("figure.preview img")).to_have_attribute("src", re.compile(r"^blob:"), timeout=15_000)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    probe.screenshot("phone-preview")
    expect(card).to_have_attribute("data-status", "succeeded", timeout=30_000)
    probe.assert_clean()
