"""The `imagegen` command. Cheap to start: nothing here imports torch, and settings are read only
by the commands that need them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from imagegen import __version__


def cmd_serve(args: argparse.Namespace) -> int:
    from imagegen.config import SettingsError, load_settings

    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    try:
        settings = load_settings(**overrides)
    except SettingsError as error:
        print(f"imagegen: {error}", file=sys.stderr)
        return 2
    from imagegen import preflight

    findings = preflight.check(settings)
    if findings.errors:
        for problem in findings.errors:
            print(f"imagegen: cannot start: {problem}", file=sys.stderr)
        return 1
    if preflight.port_in_use(settings.host, settings.port):
        print(f"imagegen: {preflight.port_in_use_message(settings.port)}", file=sys.stderr)
        return 1

    import uvicorn

    from imagegen.api.connections import server_config
    from imagegen.main import create_app

    app = create_app(settings)
    # Header, body and keep-alive timeouts and the bound on connections (api/connections.py).
    uvicorn.Server(server_config(app, settings)).run()
    return 0


def _lazy(module: str) -> Callable[[argparse.Namespace], int]:
    """A command whose module is imported only when it runs (keeps --help fast: no torch, no FastAPI)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        name, _, function = module.partition(":")
        return int(getattr(importlib.import_module(name), function or "run")(args))

    return run


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegen",
        description="Self-hosted image generation service: Stable Diffusion, FLUX (local) and the BFL API "
        "behind one HTTP API. Settings come from SD_* environment variables and .env.",
    )
    parser.add_argument("--version", action="version", version=f"imagegen {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP service (default 0.0.0.0:7860)")
    serve.add_argument("--host", help="address to bind (overrides SD_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides SD_PORT)")
    serve.set_defaults(func=cmd_serve)

    generate = commands.add_parser(
        "generate",
        help="generate an image, in this process or with a running service (--url)",
        description="Generate images with the configured backends in this process (SD_* settings, the same "
        "engine as the service; images are stored in SD_OUTPUT_DIR), or with a running service (--url). "
        "A progress bar on stderr shows each step; the written file names go to stdout.",
    )
    generate.add_argument("prompt", help="what to draw")
    generate.add_argument("--backend", help="sd, flux-local or flux-api (default: SD_DEFAULT_BACKEND / the server's)")
    generate.add_argument(
        "--model",
        help="the backend's model: in this process any model id its setting takes (hub id, folder, built-in); "
        "with --url one the server offers (`imagegen models list --url URL`)",
    )
    generate.add_argument("--seed", type=int, help="seed (default: random; printed in the file's metadata)")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    generate.add_argument("--width", type=int, help="width in pixels (default: the model's)")
    generate.add_argument("--height", type=int, help="height in pixels (default: the model's)")
    generate.add_argument("--negative-prompt", help="what to avoid")
    generate.add_argument("--guidance-scale", type=float, help="classifier-free guidance")
    generate.add_argument("--scheduler", help="scheduler name (see GET /api/backends)")
    generate.add_argument("-n", "--num-images", type=int, default=1, help="images to generate (default 1)")
    generate.add_argument(
        "--lora",
        action="append",
        metavar="NAME[:WEIGHT]",
        help="apply a LoRA from SD_LORA_DIR (weight 1 unless given); repeat for several",
    )
    generate.add_argument(
        "--image",
        action="append",
        metavar="FILE",
        help="an input image (PNG, JPEG, WebP): the init image of img2img/inpainting, or a reference image "
        "of models that take them; repeat for several (docs/editing.md)",
    )
    generate.add_argument(
        "--mask", metavar="FILE", help="inpainting mask, the size of the first --image: white = repaint"
    )
    generate.add_argument(
        "--strength",
        type=float,
        help="how much of the init image is repainted, 0 < s <= 1 (default 0.75; 1.0 with --mask)",
    )
    generate.add_argument(
        "--out",
        help="file to write (.png/.jpg/.webp; more images: NAME-2.png...). Default: "
        "in-process, the stored file in SD_OUTPUT_DIR; remote, the server's name in this folder",
    )
    generate.add_argument(
        "--format", choices=["png", "jpeg", "webp"], help="image format (default: from --out, else png)"
    )
    generate.add_argument("--url", help="a running service, e.g. http://127.0.0.1:7860 (default: in this process)")
    generate.add_argument("--api-key", help="the service's key (default: SD_API_KEY from the environment or .env)")
    generate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    generate.add_argument("-v", "--verbose", action="store_true", help="show the service log (in-process)")
    generate.set_defaults(func=_lazy("imagegen.commands.generate"))

    models = commands.add_parser("models", help="list or pre-download models (SD_MODEL_DIR)")
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = model_commands.add_parser(
        "list",
        help="the models these settings configure and what SD_MODEL_DIR holds; with --url, a running service's models",
    )
    listing.add_argument(
        "--url", help="a running service: list the models it offers (its backends, default, state, what is loaded)"
    )
    listing.add_argument("--api-key", help="the service's key (default: SD_API_KEY)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_lazy("imagegen.commands.models:run_list"))
    pull = model_commands.add_parser(
        "pull",
        help="download a model into SD_MODEL_DIR for offline use (HF_HUB_OFFLINE=1 later)",
        description="Download a Hugging Face model (only the files the service loads) into SD_MODEL_DIR with "
        "SD_HUGGINGFACE_TOKEN, build a built-in tiny model, or copy a local diffusers folder into "
        "SD_MODEL_DIR/local/. Without ID: the sd backend's SD_MODEL_ID (or --backend's model), plus the "
        "standalone safety checker when the model has none of its own.",
    )
    pull.add_argument("model_id", nargs="?", metavar="ID", help="hub id (owner/name), built-in id, or folder")
    pull.add_argument("--backend", choices=["sd", "flux-local"], help="pull this backend's configured model")
    pull.add_argument("--no-safety-checker", action="store_true", help="do not also pull the standalone checker")
    pull.add_argument(
        "--lora",
        metavar="SOURCE",
        help="pull a LoRA instead: a hub id (owner/name) or a local .safetensors file, into SD_LORA_DIR",
    )
    pull.add_argument("--file", help="with --lora from the hub: which .safetensors file of the repository")
    pull.add_argument("--name", help="with --lora: its name in requests (default: the file's stem)")
    pull.set_defaults(func=_lazy("imagegen.commands.models:run_pull"))

    health = commands.add_parser("health", help="ask a running service whether it is ready (exit 0) or not")
    health.add_argument("--url", help="the service (default: http://127.0.0.1:SD_PORT)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    health.add_argument("--json", action="store_true", help="print the /health body as JSON")
    health.add_argument("-q", "--quiet", action="store_true", help="print nothing; the exit code says it")
    health.set_defaults(func=_lazy("imagegen.commands.health"))

    worker = commands.add_parser(
        "worker",
        help="run a worker of a cluster (SD_REDIS_URL): loads its models and runs the jobs of its backends",
        description="A GPU (or cloud) worker of a cluster (docs/scale-out.md): it loads the models of the "
        "backends it serves, leases their jobs from Redis (SD_REDIS_URL), batches them as one process does, "
        "publishes every step, stores the images into SD_OUTPUT_DIR (a folder every node shares) and finalizes "
        "them. It listens on no port. SIGTERM: finish the running batch within SD_SHUTDOWN_GRACE, give the "
        "rest back, stop.",
    )
    worker.add_argument(
        "--backend",
        action="append",
        metavar="ID",
        help="a backend to serve: sd, flux-local or flux-api (repeatable; default: SD_DEFAULT_BACKEND)",
    )
    worker.add_argument(
        "--model",
        action="append",
        metavar="MODEL",
        help="serve only this model of the backends offering it (repeatable; default: every model they offer)",
    )
    worker.add_argument("--name", help="this worker's name in the cluster (default: host-pid-random)")
    worker.add_argument(
        "--backend-factory",
        action="append",
        metavar="ID=MODULE:CALLABLE",
        help="also offer a backend built by an importable factory taking the Settings (tests, plugins)",
    )
    worker.set_defaults(func=_lazy("imagegen.commands.worker"))

    prune = commands.add_parser(
        "prune",
        help="delete old stored images now (SD_OUTPUT_RETENTION_DAYS / SD_OUTPUT_MAX_GB, or the options)",
        description="Delete stored images in SD_OUTPUT_DIR beyond the retention limits (the options, else "
        "SD_OUTPUT_RETENTION_DAYS and SD_OUTPUT_MAX_GB), oldest first. Images written in the last 5 minutes are "
        "never deleted, whatever the limits (a caller may still be downloading one, a webhook delivering it): "
        "they are listed as kept, with that reason. Only the service's own image files are considered.",
    )
    prune.add_argument("--days", type=_positive, help="delete images older than this many days")
    prune.add_argument("--max-gb", type=_positive, help="then delete the oldest until at most this many GB remain")
    prune.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    prune.add_argument("-v", "--verbose", action="store_true", help="also list every image kept within the limits")
    prune.set_defaults(func=_lazy("imagegen.commands.prune"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
