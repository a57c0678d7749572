"""A1111's "extra networks" in the prompt: `<lora:name:weight>` tags.

A1111 finds every `<type:arguments>` in the positive prompt, removes it from the text the model sees,
and applies it. Here `<lora:name>` (weight 1) and `<lora:name:weight>` become the request's LoRAs;
A1111's separate text-encoder/UNet weights (`<lora:name:0.8:0.5>`, `te=`, `unet=`, `dyn=`) are a 422
(one weight per LoRA here), and tags of other types (`<hypernet:...>`, `<lyco:...>`) are removed
like A1111 does and reported in `ignored_parameters`. A tag that names no LoRA in SD_LORA_DIR is a
422 when the backend resolves the request (never silently dropped).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from imagegen.errors import InvalidParameterError
from imagegen.generation import LoraWeight

# A1111's own pattern (modules/extra_networks.py): a word, a colon, anything up to ">".
_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ParsedPrompt:
    #: The prompt without its extra-network tags: what the model sees.
    text: str
    loras: tuple[LoraWeight, ...]
    #: Extra-network types removed but not applied (`hypernet`, `lyco`, ...).
    ignored_types: tuple[str, ...]


def parse(prompt: str) -> ParsedPrompt:
    loras: list[LoraWeight] = []
    ignored: list[str] = []
    for match in _TAG.finditer(prompt):
        kind, arguments = match.group(1).lower(), match.group(2)
        if kind != "lora":
            if kind not in ignored:
                ignored.append(kind)
            continue
        loras.append(_lora(arguments))
    if not loras and not ignored:
        return ParsedPrompt(prompt, (), ())
    text = _TAG.sub("", prompt).strip()
    return ParsedPrompt(text, tuple(loras), tuple(ignored))


def _lora(arguments: str) -> LoraWeight:
    name, *weights = [part.strip() for part in arguments.split(":")]
    if not name:
        raise InvalidParameterError("a <lora:name:weight> tag needs a name", param="prompt")
    if len(weights) > 1 or any("=" in weight for weight in weights):
        raise InvalidParameterError(
            "a <lora:...> tag takes one weight here (<lora:name:weight>), not separate text-encoder/UNet weights",
            param="prompt",
        )
    weight = 1.0
    if weights:
        try:
            weight = float(weights[0])
        except ValueError:
            raise InvalidParameterError("the weight in <lora:name:weight> must be a number", param="prompt") from None
        if not math.isfinite(weight):
            raise InvalidParameterError("the weight in <lora:name:weight> must be a finite number", param="prompt")
    return LoraWeight(name=name, weight=weight)
