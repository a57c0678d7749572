"""Request and response models of the AUTOMATIC1111 dialect (`/sdapi/v1/*`).

Unlike the native API, unknown keys are accepted and ignored: A1111 clients send the whole A1111
request model (hires fix, scripts, ControlNet units, their own extra keys), and an A1111 server
ignores what it does not use. Types are A1111's (lax: "20" is 20), and null is accepted wherever
clients are seen to send it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from imagegen.api import model_catalog
from imagegen.api.a1111 import extra_networks
from imagegen.api.a1111.samplers import to_scheduler
from imagegen.api.dialects import Dialect, documented_errors
from imagegen.api.translation import RequestDefaults, Target
from imagegen.api.uploads import StoredInputs
from imagegen.errors import InvalidParameterError
from imagegen.generation import GenerationParams, ResizeMode

if TYPE_CHECKING:
    from imagegen.backends.registry import BackendRegistry

_HARD_MAX_SIDE = 16384
_HARD_MAX_TEXT = 100_000
#: Where an A1111 request names its checkpoint (for this request only).
CHECKPOINT_PARAM = "override_settings.sd_model_checkpoint"


def checkpoint_for(registry: BackendRegistry, name: str) -> model_catalog.Checkpoint:
    """The (backend, model) pair a checkpoint name means; unknown: a 422 listing the usable ones."""
    found = model_catalog.find(registry, name)
    if found is None:
        titles = [pair.title for pair in model_catalog.checkpoints(registry, usable_only=True)]
        raise InvalidParameterError(
            f"unknown checkpoint; available: {', '.join(titles)} (GET /sdapi/v1/sd-models)", param=CHECKPOINT_PARAM
        )
    return found


class A1111Txt2ImgRequest(BaseModel):
    """The fields of A1111's StableDiffusionTxt2ImgProcessingAPI this service uses or reports."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a lighthouse at dawn",
                    "steps": 20,
                    "sampler_name": "Euler a",
                    "seed": -1,
                    "width": 512,
                    "height": 512,
                }
            ]
        },
    )

    prompt: str | None = Field("", max_length=_HARD_MAX_TEXT)
    negative_prompt: str | None = Field("", max_length=_HARD_MAX_TEXT)
    seed: int | None = Field(-1, ge=-1, description="-1: random. The seeds used are in info.all_seeds.")
    steps: int | None = Field(None, ge=1, le=1000, description="Absent: the model's default (not A1111's 50).")
    cfg_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False, description="Absent: the model's default.")
    width: int | None = Field(None, ge=1, le=_HARD_MAX_SIDE, description="Absent: the model's native size.")
    height: int | None = Field(None, ge=1, le=_HARD_MAX_SIDE)
    batch_size: int | None = Field(1, ge=1, le=64)
    n_iter: int | None = Field(1, ge=1, le=64, description="Batches; batch_size x n_iter images in all.")
    sampler_name: str | None = Field(
        None, max_length=64, description="GET /sdapi/v1/samplers; absent: the model's own."
    )
    sampler_index: str | None = Field(None, max_length=64, description="Deprecated A1111 name of sampler_name.")
    scheduler: str | None = Field(None, max_length=64, description="Schedule type: automatic (default) or karras.")
    override_settings: dict[str, Any] | None = Field(
        None, description="sd_model_checkpoint picks the checkpoint (backend and model) for this request only."
    )
    override_settings_restore_afterwards: bool | None = True
    send_images: bool | None = Field(True, description="false: `images` is empty (they are stored all the same).")
    save_images: bool | None = Field(False, description="Ignored: every image is stored (SD_OUTPUT_DIR).")
    # A1111 features this service does not have: accepted, and reported in info.ignored_parameters
    # when a request actually asks for them.
    styles: list[str] | None = None
    enable_hr: bool | None = False
    restore_faces: bool | None = None
    tiling: bool | None = None
    subseed_strength: float | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        """The A1111 features asked for that this service does not have."""
        asked = {
            "enable_hr": bool(self.enable_hr),
            "restore_faces": bool(self.restore_faces),
            "tiling": bool(self.tiling),
            "styles": bool(self.styles),
            "subseed_strength": bool(self.subseed_strength),
            "script_name": bool(self.script_name),
            "alwayson_scripts": bool(self.alwayson_scripts),
        }
        names = [name for name, wanted in asked.items() if wanted]
        names += [f"override_settings.{key}" for key in (self.override_settings or {}) if key != "sd_model_checkpoint"]
        names += [f"extra_networks.{kind}" for kind in extra_networks.parse(self.prompt or "").ignored_types]
        return names

    # -- translation (api/translation.py) ---------------------------------------------------------
    def target(self, registry: BackendRegistry) -> Target:
        """The checkpoint `override_settings` names (for this request only), else the service's default."""
        checkpoint = (self.override_settings or {}).get("sd_model_checkpoint")
        if checkpoint is None:
            return Target(registry.get(None))
        if not isinstance(checkpoint, str):
            raise InvalidParameterError("must be a checkpoint title (a string)", param=CHECKPOINT_PARAM)
        pair = checkpoint_for(registry, checkpoint)
        return Target(registry.get(pair.backend), pair.model)

    def to_params(self, defaults: RequestDefaults) -> GenerationParams:
        count = (self.batch_size or 1) * (self.n_iter or 1)
        if count > defaults.max_images:
            # One job carries all batch_size x n_iter images (consecutive seeds, as A1111 gives them).
            raise InvalidParameterError(
                f"batch_size x n_iter must be at most {defaults.max_images} (SD_MAX_IMAGES)", param="batch_size"
            )
        # <lora:name:weight> tags become the request's LoRAs and leave the text the model sees.
        prompt = extra_networks.parse(self.prompt or "")
        return GenerationParams(
            prompt=prompt.text,
            loras=prompt.loras,
            negative_prompt=self.negative_prompt or None,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.cfg_scale,
            seed=-1 if self.seed is None else self.seed,
            num_images=count,
            scheduler=self._scheduler(defaults)[0],
            output_format="png",  # A1111 API answers are PNG
            model=defaults.model,
        )

    def ignored(self, defaults: RequestDefaults) -> list[str]:
        """The A1111 fields sent but not used, in A1111's names (the backend reports its own on top)."""
        return self._scheduler(defaults)[1] + self.unsupported()

    def _scheduler(self, defaults: RequestDefaults) -> tuple[str, list[str]]:
        """Our scheduler for the sampler and schedule type asked for, and the A1111 fields ignored."""
        scheduler, ignored = to_scheduler(self.sampler_name or self.sampler_index, self.scheduler)
        offered = defaults.schedulers
        if offered and scheduler not in offered:
            # A1111 clients send a sampler with every request ("Euler a" by default); one this backend
            # does not offer gives the model's own scheduler, reported, rather than a failed request.
            scheduler = "default" if "default" in offered else offered[0]
            ignored.append("sampler_name")
        return scheduler, ignored


#: A1111's resize modes: 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent
#: upscale, which this service does as 0, reported).
RESIZE_MODES: dict[int, ResizeMode] = {0: "resize", 1: "crop", 2: "fill", 3: "resize"}


class A1111Img2ImgRequest(A1111Txt2ImgRequest):
    """The fields of A1111's StableDiffusionImg2ImgProcessingAPI this service uses or reports."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"prompt": "the same, in winter", "init_images": ["<base64>"], "denoising_strength": 0.6}]
        },
    )

    init_images: list[str] | None = Field(
        None, max_length=64, description="Base64 or data: URLs (PNG, JPEG, WebP); never a URL to fetch."
    )
    mask: str | None = Field(None, description="White (or opaque) = repaint; the size of init_images[0].")
    denoising_strength: float | None = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    inpainting_mask_invert: int | None = Field(0, ge=0, le=1, description="1: repaint where the mask is black.")
    mask_blur: int | None = Field(4, ge=0, le=64, description="Gaussian blur radius applied to the mask.")
    inpainting_fill: int | None = Field(
        0, ge=0, le=3, description="Only 1 (original) is how inpainting works here; others are reported ignored."
    )
    resize_mode: int | None = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill.")
    include_init_images: bool | None = Field(False, description="Echo init_images and mask in `parameters`.")
    inpaint_full_res: bool | None = None
    inpaint_full_res_padding: int | None = None
    initial_noise_multiplier: float | None = None
    image_cfg_scale: float | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        if self.mask is not None:
            if self.inpainting_fill not in (None, 1):
                names.append("inpainting_fill")
            if self.inpaint_full_res:
                names.append("inpaint_full_res")
        if self.resize_mode == 3:
            names.append("resize_mode")
        if self.initial_noise_multiplier not in (None, 1, 1.0):
            names.append("initial_noise_multiplier")
        return names

    def to_params(self, defaults: RequestDefaults, inputs: StoredInputs | None = None) -> GenerationParams:
        params = super().to_params(defaults)
        update: dict[str, Any] = {
            "strength": self.denoising_strength,
            "resize_mode": RESIZE_MODES[self.resize_mode or 0],
        }
        if inputs is not None:
            update.update(images=inputs.images, mask=inputs.mask)
        return params.model_copy(update=update)


class A1111Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="Bare base64 PNGs, each with its A1111 `parameters` text chunk.")
    parameters: dict[str, Any] = Field(description="The request as understood (known fields, defaults filled).")
    info: str = Field(description="A JSON string: seed, all_seeds, infotexts, width, height, sampler_name, ...")


class A1111Progress(BaseModel):
    progress: float = Field(description="0..1: the running job's denoising progress; 0 when idle.")
    eta_relative: float = Field(description="Estimated seconds until the running job ends.")
    state: dict[str, Any]
    current_image: str | None = Field(
        None,
        description="The running job's live preview (base64 JPEG of its current latents, local backends); null "
        "before the first one, with skip_current_image=true, or when idle.",
    )
    textinfo: str | None = None


class A1111Checkpoint(BaseModel):
    title: str = Field(description="What sd_model_checkpoint takes: 'model [backend]'.")
    model_name: str
    hash: str | None = Field(description="A short stable id of the (backend, model) pair, not a weights hash.")
    sha256: str | None
    filename: str = Field(description="The model id (hub id, folder or built-in name).")
    config: str | None = None
    backend: str = Field(description="Extension: the backend serving this model.")


class A1111Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class A1111Scheduler(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class A1111ErrorResponse(BaseModel):
    """A1111's error shape (its exception handler's strings), without the request echoed back."""

    error: str
    detail: str
    errors: str
    param: str | None = None
    request_id: str | None = None


#: Documented on every /sdapi/v1 route.
A1111_ERRORS = documented_errors(
    Dialect.A1111, A1111ErrorResponse, (400, 401, 402, 404, 409, 413, 415, 422, 429, 500, 502, 503, 504)
)
