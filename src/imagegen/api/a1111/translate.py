"""Translation between the A1111 dialect and the engine: an A1111 txt2img or img2img request becomes one
job's GenerationParams (the request model's `target` and `to_params`, api/translation.py), and the
finished job becomes A1111's `{images, parameters, info}`. img2img masks are read as A1111 reads them
(`a1111_mask`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from imagegen import __version__
from imagegen.api import model_catalog, presenters
from imagegen.api.a1111.samplers import a1111_names
from imagegen.api.a1111.schemas import CHECKPOINT_PARAM, A1111Img2ImgRequest, A1111Txt2ImgRequest
from imagegen.api.translation import defaults_for
from imagegen.api.uploads import StoredInputs, Upload, check_count, from_base64, prepare
from imagegen.backends.registry import BackendRegistry
from imagegen.config import Settings
from imagegen.engine.jobs import Job, JobStatus
from imagegen.engine.results import StoredImage
from imagegen.errors import ContentModeratedError, InvalidParameterError
from imagegen.generation import GenerationParams
from imagegen.storage.image_decoding import DecodedImage, decode_base64, mask_from_paint
from imagegen.storage.inputs import InputStore
from imagegen.storage.metadata import a1111_parameters
from imagegen.storage.outputs import OutputStore

if TYPE_CHECKING:
    from PIL.Image import Image

#: Native parameter names -> A1111's, for error messages and ignored_parameters.
A1111_NAMES = {
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "scheduler": "sampler_name",
    "model": CHECKPOINT_PARAM,
    "backend": CHECKPOINT_PARAM,
    "images": "init_images",
    "strength": "denoising_strength",
    "resize_mode": "resize_mode",
}


def a1111_mask(decoded: DecodedImage, *, invert: bool, blur: int) -> Image:
    """A1111's reading of an img2img mask: its alpha where it has transparency, else its brightness,
    rounded to black or white (create_binary_mask), inverted on request, then blurred by mask_blur."""
    from PIL import ImageFilter, ImageOps

    mask = mask_from_paint(decoded, binary=True)
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask


def store_inputs(body: A1111Img2ImgRequest, store: InputStore, settings: Settings) -> StoredInputs:
    """init_images and mask, decoded and stored (a worker thread's job: decoding is CPU work)."""
    check_count(len(body.init_images or []), settings, "init_images")
    images = from_base64(body.init_images or [], "init_images")
    if not images:
        raise InvalidParameterError("init_images must hold at least one image", param="init_images")
    mask = None if body.mask is None else Upload("mask", decode_base64(body.mask, param="mask"))
    invert, blur = bool(body.inpainting_mask_invert), body.mask_blur or 0
    return prepare(store, settings, images, mask, mask_rule=lambda found: a1111_mask(found, invert=invert, blur=blur))


@dataclass
class Plan:
    """What a txt2img request asks the engine for."""

    params: GenerationParams
    backend_id: str | None
    ignored: list[str] = field(default_factory=list)


def plan(
    body: A1111Txt2ImgRequest, registry: BackendRegistry, settings: Settings, inputs: StoredInputs | None = None
) -> Plan:
    """The request side in one call: the body's translation and the A1111 fields it reports as ignored."""
    defaults = defaults_for(body, registry, settings)
    if isinstance(body, A1111Img2ImgRequest):
        return Plan(body.to_params(defaults, inputs), defaults.backend, body.ignored(defaults))
    return Plan(body.to_params(defaults), defaults.backend, body.ignored(defaults))


def _infotext(job: Job, image: StoredImage, sampler: tuple[str, str] | None) -> str:
    request = job.request
    seed = image.seed
    label = None
    if sampler is not None:
        # The pre-1.9 combined form ("DPM++ 2M Karras"), which every infotext parser reads.
        label = sampler[0] if sampler[1] == "Automatic" else f"{sampler[0]} {sampler[1]}"
    return a1111_parameters(
        {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "steps": request.steps,
            "scheduler": label,
            "guidance_scale": request.guidance_scale,
            "seed": seed,
            "strength": request.strength,
            "width": request.width,
            "height": request.height,
            "model": request.model,
            "backend": request.backend,
            "version": __version__,
            "loras": _loras_of(image),
        }
    )


def _loras_of(image: StoredImage) -> list[dict[str, Any]]:
    """The LoRAs the backend applied to this image (name, weight, sha256)."""
    loras = image.info.get("loras")
    return loras if isinstance(loras, list) else []


def _extra_params(sampler: tuple[str, str] | None, image: StoredImage | None) -> dict[str, Any]:
    extra: dict[str, Any] = {"Schedule type": sampler[1]} if sampler else {}
    loras = _loras_of(image) if image is not None else []
    if loras:
        extra["Lora hashes"] = ", ".join(f"{lora['name']}: {str(lora.get('sha256', ''))[:12]}" for lora in loras)
    return extra


def response_body(body: A1111Txt2ImgRequest, job: Job, plan_: Plan, outputs: OutputStore) -> dict[str, Any]:
    """A1111's answer. An interrupted (cancelled) job answers 200 with no images, as A1111 answers an
    interrupted generation; a job whose every image the safety checker flagged is a 422."""
    request = job.request
    delivered: list[tuple[StoredImage, str]] = []  # with its base64
    flagged: list[StoredImage] = []
    if job.status is JobStatus.SUCCEEDED and job.result is not None:
        for image in job.result.images:
            b64 = presenters.image_b64(image, outputs)
            if b64 is None:
                flagged.append(image)  # flagged, or its file pruned since: no content either way
            else:
                delivered.append((image, b64))
        if flagged and not delivered:
            raise ContentModeratedError("the safety checker flagged every image; no content is returned")
    sampler = a1111_names(request.scheduler)
    checkpoint = model_catalog.Checkpoint(request.backend, request.model)
    seeds = [image.seed for image, _ in delivered]
    negative = request.negative_prompt or ""
    ignored = list(dict.fromkeys(plan_.ignored + [A1111_NAMES.get(name, name) for name in request.ignored]))
    info = {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * len(seeds),
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * len(seeds),
        "seed": request.seeds[0],
        "all_seeds": seeds,
        "subseed": request.seeds[0],
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": request.width,
        "height": request.height,
        "sampler_name": sampler[0] if sampler else None,
        "cfg_scale": request.guidance_scale,
        "steps": request.steps,
        "batch_size": body.batch_size or 1,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": request.model,
        "sd_model_hash": checkpoint.short_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.strength or 0,
        "extra_generation_params": _extra_params(sampler, delivered[0][0] if delivered else None),
        "index_of_first_image": 0,
        "infotexts": [_infotext(job, image, sampler) for image, _ in delivered],
        "styles": [],
        "job_timestamp": datetime.fromtimestamp(job.created_at, UTC).strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": request.mode == "inpaint",
        "version": f"imagegen {__version__}",
        # Extensions (A1111 clients ignore keys they do not know):
        "sd_model_checkpoint": checkpoint.title,
        "backend": request.backend,
        "job_id": job.id,
        "interrupted": job.status is JobStatus.CANCELLED,
        "nsfw_filtered_seeds": [image.seed for image in flagged],
        "ignored_parameters": ignored,
    }
    parameters = body.model_dump(mode="json")
    if isinstance(body, A1111Img2ImgRequest):
        info["mode"] = request.mode
        if not body.include_init_images:
            # As A1111 answers: the (large) inputs are echoed only when asked for.
            parameters.update(init_images=None, mask=None)
    return {
        "images": [b64 for _, b64 in delivered] if body.send_images is not False else [],
        "parameters": parameters,
        "info": json.dumps(info),
    }
