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

from PIL.PngImagePlugin import PngInfo

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
    the job, the service's version, the backend's scalar info (BFL's task id and seed), and the
    LoRAs applied (name, weight, the file's sha256, as the backend reports them)."""
    meta: dict[str, Any] = {
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
        # Image-conditioned: the mode, strength and the inputs' content hashes (their pixels stay out).
        **(
            {}
            if request.mode == "txt2img"
            else {
                "mode": request.mode,
                "strength": request.strength,
                "input_images": [image.sha256 for image in request.images],
            }
        ),
        **{key: value for key, value in info.items() if isinstance(value, (str, int, float))},
    }
    loras = info.get("loras")
    if isinstance(loras, list) and loras:
        meta["loras"] = loras
    elif request.loras:
        meta["loras"] = [{"name": lora.name, "weight": lora.weight} for lora in request.loras]
    return meta


def lora_tags(loras: list[dict[str, Any]]) -> str:
    """A1111's prompt tags for the LoRAs used (`<lora:name:weight>`): what its infotext parsers read
    to apply them again."""
    return " ".join(f"<lora:{lora.get('name')}:{lora.get('weight'):g}>" for lora in loras)


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The A1111 "parameters" text: prompt (with its LoRA tags, as A1111 writes them), optional
    negative prompt line, then key: value pairs.

    Readers split it into lines (the last one holds the fields, a line starting "Negative prompt:" is
    the negative prompt), so each part is one line: a prompt holding "\nSteps: 999" or
    "\nNegative prompt: ..." cannot pass for a field. Line breaks and other control characters (a NUL
    would end a PNG text chunk early for many readers) become spaces here; the exact prompt is in the
    `imagegen` JSON chunk."""
    found = meta.get("loras")
    loras: list[dict[str, Any]] = found if isinstance(found, list) else []
    prompt = _one_line(meta.get("prompt", ""))
    lines = [f"{prompt} {lora_tags(loras)}" if loras else prompt]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {_one_line(meta['negative_prompt'])}")
    fields: list[tuple[str, Any]] = [
        ("Steps", meta.get("steps")),
        ("Sampler", meta.get("scheduler")),
        ("CFG scale", meta.get("guidance_scale")),
        ("Seed", meta.get("seed")),
        ("Denoising strength", meta.get("strength")),
        ("Size", f"{meta.get('width')}x{meta.get('height')}"),
        ("Model", meta.get("model")),
        ("Backend", meta.get("backend")),
        ("Lora hashes", _lora_hashes(loras)),
        ("Version", f"imagegen {meta.get('version')}" if meta.get("version") else None),
    ]
    # Lora hashes is quoted (its commas stay, as A1111 writes it); LoRA names hold no quote or newline.
    cleaned = [(key, value if key == "Lora hashes" else _clean(value)) for key, value in fields if value is not None]
    lines.append(", ".join(f"{key}: {value}" for key, value in cleaned))
    return "\n".join(lines)


def _lora_hashes(loras: list[dict[str, Any]]) -> str | None:
    """A1111's `Lora hashes: "name: 12 hex, ..."` (quoted: it holds commas)."""
    pairs = [f"{lora.get('name')}: {str(lora['sha256'])[:12]}" for lora in loras if lora.get("sha256")]
    return '"' + ", ".join(pairs) + '"' if pairs else None


#: Line breaks (CR, LF, NEL, U+2028/9) and every other control character, NUL included.
_CONTROL = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]+")


def _one_line(value: Any) -> str:
    return _CONTROL.sub(" ", str(value))


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
    return _one_line(value).replace(",", " ")


def png_info(meta: dict[str, Any]) -> PngInfo:

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
