"""Generation parameters embedded in the image files themselves.

PNG: an A1111-style `parameters` text chunk (what A1111's "PNG info", Civitai and most viewers read)
and an `imagegen` JSON chunk. JPEG/WebP: the same text in EXIF UserComment (A1111's choice) and the
JSON in an XMP packet. Reading never evaluates anything: text and JSON only.
"""

from __future__ import annotations

import html
import json
import re
from typing import TYPE_CHECKING, Any

from imagegen import __version__

if TYPE_CHECKING:
    from imagegen.generation import GenerationRequest

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
JSON_KEY = "imagegen"
XMP_NS = "https://github.com/imagegen/ns/1.0/"


def file_metadata(
    request: GenerationRequest, *, seed: int, width: int, height: int, info: dict[str, Any], job_id: str
) -> dict[str, Any]:
    """What a stored image carries about how it was made: the request, this image's seed and size,
    the job, the service's version, and the backend's scalar info (BFL's task id and seed)."""
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "backend": request.backend,
        "model": request.model,
        "width": width,
        "height": height,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "scheduler": request.scheduler,
        "seed": seed,
        "job_id": job_id,
        "version": __version__,
        **{key: value for key, value in info.items() if isinstance(value, (str, int, float))},
    }


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The A1111 "parameters" text: prompt, optional negative prompt line, then key: value pairs."""
    lines = [str(meta.get("prompt", ""))]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields: list[tuple[str, Any]] = [
        ("Steps", meta.get("steps")),
        ("Sampler", meta.get("scheduler")),
        ("CFG scale", meta.get("guidance_scale")),
        ("Seed", meta.get("seed")),
        ("Size", f"{meta.get('width')}x{meta.get('height')}"),
        ("Model", meta.get("model")),
        ("Backend", meta.get("backend")),
        ("Version", f"imagegen {meta.get('version')}" if meta.get("version") else None),
    ]
    lines.append(", ".join(f"{key}: {_clean(value)}" for key, value in fields if value is not None))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> dict[str, Any]:
    """The fields of an A1111 "parameters" text (what A1111's PNG info shows): `Prompt`, `Negative
    prompt`, then each `Key: value` of the last line as text, `Size` split into `Size-1` and `Size-2`
    (integers). Text that is not in this format gives {"Prompt": text}. Nothing is evaluated."""
    lines = text.strip().split("\n")
    fields_line = ""
    if len(_FIELD.findall(lines[-1])) >= 3:  # "Steps: 20, Sampler: ..., Seed: 1": A1111's last line
        fields_line = lines.pop()
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)  # a negative prompt over several lines
        else:
            prompt.append(line)
    found: dict[str, Any] = {"Prompt": "\n".join(prompt).strip()}
    if negative:
        found["Negative prompt"] = "\n".join(negative).strip()
    for key, value in _FIELD.findall(fields_line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        found[key.strip()] = value
    size = re.fullmatch(r"(\d+)x(\d+)", str(found.get("Size", "")))
    if size:
        found["Size-1"], found["Size-2"] = int(size.group(1)), int(size.group(2))
    return found


def _clean(value: Any) -> str:
    # Values are single-line and comma-separated in this format.
    return str(value).replace("\n", " ").replace(",", " ")


def png_info(meta: dict[str, Any]):  # type: ignore[no-untyped-def]
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(meta))
    info.add_itxt(JSON_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
    return info


def exif_bytes(meta: dict[str, Any]) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\x00" + a1111_parameters(meta).encode("utf-16-be")
    return exif.tobytes()


def xmp_packet(meta: dict[str, Any]) -> bytes:
    payload = html.escape(json.dumps(meta, ensure_ascii=False, sort_keys=True), quote=True)
    text = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:imagegen="{XMP_NS}" imagegen:parameters="{payload}"/>'
        "</rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    )
    return text.encode("utf-8")


_XMP_ATTR = re.compile(r'imagegen:parameters="([^"]*)"')


def read_metadata(path: Any) -> dict[str, Any]:
    """Read back what `png_info`/`exif_bytes`/`xmp_packet` wrote: {"parameters": str, "imagegen": dict}."""
    from PIL import Image

    found: dict[str, Any] = {}
    with Image.open(path) as image:
        info = dict(image.info)
        if "parameters" in info:
            found["parameters"] = info["parameters"]
        if JSON_KEY in info:
            found[JSON_KEY] = json.loads(info[JSON_KEY])
        exif = image.getexif().get_ifd(EXIF_IFD)
        comment = exif.get(USER_COMMENT)
        if isinstance(comment, bytes) and comment.startswith(b"UNICODE\x00"):
            found["parameters"] = comment[8:].decode("utf-16-be")
        xmp = info.get("xmp")
        if isinstance(xmp, (bytes, str)) and JSON_KEY not in found:
            text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
            match = _XMP_ATTR.search(text)
            if match:
                found[JSON_KEY] = json.loads(html.unescape(match.group(1)))
    return found
