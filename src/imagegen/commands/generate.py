"""`imagegen generate`: one generation from the command line.

Without --url it runs in this process on the services the service builds (services.py), with a
job store in memory (a CLI run must never pick up, and run, the jobs a service left
queued in SD_DATA_DIR). With --url it asks a running service over HTTP and follows the job's
Server-Sent Events. Either way a progress bar shows each denoising step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagegen.commands.progress import ProgressBar

if TYPE_CHECKING:
    from imagegen.engine.results import JobResult

FORMAT_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
FINAL = ("succeeded", "failed", "cancelled")


def _fail(message: str, code: int = 1) -> int:
    print(f"imagegen: {message}", file=sys.stderr)
    return code


def output_format(args: argparse.Namespace) -> str:
    if args.format:
        return str(args.format)
    if args.out:
        suffix = Path(args.out).suffix.lower()
        if suffix not in FORMAT_BY_SUFFIX:
            raise ValueError(f"--out must end in .png, .jpg, .jpeg or .webp (or pass --format), not '{suffix}'")
        return FORMAT_BY_SUFFIX[suffix]
    return "png"


def input_files(args: argparse.Namespace) -> tuple[list[tuple[str, bytes]], tuple[str, bytes] | None]:
    """(field, bytes) of every --image, and of --mask; a file that cannot be read is a ValueError."""

    def read(path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror}") from None

    images = [(f"images[{index}]", read(path)) for index, path in enumerate(getattr(args, "image", None) or [])]
    mask = getattr(args, "mask", None)
    if mask and not images:
        raise ValueError("--mask needs the --image it applies to")
    return images, (("mask", read(mask)) if mask else None)


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The native API's request body (the in-process path builds the same GenerationParams from it)."""
    body: dict[str, Any] = {"prompt": args.prompt, "output_format": output_format(args), "num_images": args.num_images}
    if getattr(args, "strength", None) is not None:
        body["strength"] = args.strength
    optional = {
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "width": args.width,
        "height": args.height,
        "guidance_scale": args.guidance_scale,
        "scheduler": args.scheduler,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if getattr(args, "lora", None):
        body["loras"] = [parse_lora(text) for text in args.lora]
    return body


def parse_lora(text: str) -> dict[str, Any]:
    """`--lora name[:weight]` as the API's {"name", "weight"} (names never hold a colon)."""
    name, _, weight = text.partition(":")
    if not name:
        raise ValueError("--lora takes NAME or NAME:WEIGHT")
    try:
        return {"name": name, "weight": float(weight) if weight else 1.0}
    except ValueError:
        raise ValueError(f"--lora {name}: the weight must be a number") from None


def destination(out: str | None, index: int, server_name: str) -> Path:
    """--out for the first image, `stem-2.ext`, `stem-3.ext`... for the next; the server's name without --out."""
    if not out:
        return Path(server_name)
    path = Path(out)
    return path if index == 0 else path.with_name(f"{path.stem}-{index + 1}{path.suffix}")


def run(args: argparse.Namespace) -> int:
    try:
        body = request_body(args)
        images, mask = input_files(args)
    except ValueError as error:
        return _fail(str(error), 2)
    if args.url:
        import base64

        if images:
            body["images"] = [base64.b64encode(data).decode("ascii") for _, data in images]
        if mask is not None:
            body["mask"] = base64.b64encode(mask[1]).decode("ascii")
        return _remote(args, body)
    import asyncio

    from imagegen.config import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as error:
        return _fail(str(error), 2)
    return asyncio.run(_in_process(args, body, with_model(settings, args.backend, args.model), images, mask))


#: The setting that names a local backend's model: `--model` in this process replaces it for this run.
MODEL_SETTINGS = {"sd": "model_id", "flux-local": "flux_model_id"}


def with_model(settings: Any, backend: str | None, model: str | None) -> Any:
    """The settings with --model as the chosen local backend's model (the operator runs this process: any
    model it could configure, not only the allowlist a service offers its clients). flux-api's models
    are BFL's: --model is then a request's model, checked against SD_BFL_MODELS."""
    setting = MODEL_SETTINGS.get(backend or settings.default_backend.value)
    if model is None or setting is None:
        return settings
    return settings.model_copy(update={setting: model})


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """(whether a TCP connection to the Hugging Face endpoint opens within `timeout`, its host). Only
    asked when a model must be downloaded: huggingface_hub would otherwise retry for half a minute."""
    import socket
    from urllib.parse import urlsplit

    try:
        from huggingface_hub import constants

        endpoint = urlsplit(constants.ENDPOINT)
    except Exception:  # noqa: BLE001 - huggingface_hub missing: the load reports it
        return True, "huggingface.co"
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, host
    except OSError:
        return False, host


# -- in this process --------------------------------------------------------------------------------


async def _in_process(
    args: argparse.Namespace,
    body: dict[str, Any],
    settings: Any,
    images: list[tuple[str, bytes]],
    mask: tuple[str, bytes] | None,
) -> int:
    import asyncio

    from imagegen.backends.base import BackendState
    from imagegen.engine.jobs import JobStatus
    from imagegen.engine.store import SQLiteJobStore
    from imagegen.errors import ServiceError
    from imagegen.generation import GenerationParams
    from imagegen.logging_setup import configure_logging
    from imagegen.services import build_services

    configure_logging("debug" if args.verbose else "warning", settings.log_format)
    # One job, in this process: the pipeline runs in a thread here, no device process is started
    # (there is no queue to protect from a wedged call, and Ctrl+C ends the whole process).
    settings = settings.model_copy(update={"device_isolation": "thread"})
    try:
        # No webhooks (a CLI job takes no callback URL) and none of a service's upkeep (retention,
        # disk measurement); the job store in memory: never the queue a service left in SD_DATA_DIR.
        services = build_services(
            settings,
            store=SQLiteJobStore(":memory:"),
            default_backend=args.backend,
            upkeep=False,
            distributed=False,  # in-process means here, even on a node of a cluster (SD_REDIS_URL)
        )
    except ValueError:
        from imagegen.backends.registry import DEFAULT_FACTORIES

        return _fail(f"unknown backend; known backends: {', '.join(DEFAULT_FACTORIES)}", 2)
    engine, events, outputs = services.engine, services.events, services.outputs
    bar = ProgressBar("generate", enabled=not args.quiet)
    try:
        backend = services.registry.get(args.backend)
        # Before anything loads: a model that cannot come from the cache or the hub fails now, in about a
        # second, with what to do (not after half a minute of hub retries in a loading thread).
        problem = _cannot_load(backend, bar)
        if problem is not None:
            return _fail(problem)
        await services.start()
        available = backend.availability()
        if available.state is BackendState.ERROR:
            return _fail(f"backend '{backend.id}' cannot run: {available.reason}")
        params = GenerationParams(**{key: value for key, value in body.items() if key != "backend"})
        if images:
            # Decoded and stored as the service does it (api/uploads.py): the same checks, the same store.
            from imagegen.api import uploads

            stored = await asyncio.to_thread(
                uploads.prepare,
                services.inputs,
                settings,
                [uploads.Upload(name, data) for name, data in images],
                None if mask is None else uploads.Upload(*mask),
            )
            params = params.model_copy(update={"images": stored.images, "mask": stored.mask})
        job = await engine.submit(params, backend.id)
        queue = events.subscribe(job.id)  # before the first await: no event of this job is missed
        while True:
            event = await queue.get()
            if event.event == "progress":
                bar.update(int(event.data["step"]), int(event.data["total"]))
            elif event.final:
                break
        bar.close()
        job = await engine.get(job.id)
        if job.status is not JobStatus.SUCCEEDED:
            error = job.error or {}
            return _fail(f"{error.get('type', job.status.value)}: {error.get('message', 'the job did not succeed')}")
        return _write_local(args, job.result, outputs.root)
    except ServiceError as error:
        bar.close()
        return _fail(f"{error.error_type}: {error.message}", 2 if error.status_code < 500 else 1)
    finally:
        await services.stop(grace=0)


def _cannot_load(backend: Any, bar: ProgressBar) -> str | None:
    """Why the backend's model cannot load here (not cached, and the hub is off or unreachable), or None;
    says so when a download is about to start."""
    from imagegen.backends.local.base import LocalPipelineBackend
    from imagegen.backends.local.support import hub_offline, uncached_reason

    if not isinstance(backend, LocalPipelineBackend):
        return None
    missing = backend.uncached_models()
    if not missing:
        return None
    pull = f"imagegen models pull {backend.model_id}"
    if hub_offline():
        return uncached_reason(missing, pull)
    reachable, host = hub_reachable()
    if not reachable:
        return uncached_reason(missing, pull, why=f"the Hugging Face hub ({host}) cannot be reached")
    bar.note(f"downloading {', '.join(missing)} into SD_MODEL_DIR (first use: this may take minutes)")
    return None


def _write_local(args: argparse.Namespace, result: JobResult | None, root: Path) -> int:
    written = 0
    for index, image in enumerate(result.images if result is not None else []):
        if image.filename is None:
            _warn_flagged(index, image.seed)
            continue
        stored = root / image.filename
        if args.out:
            target = destination(args.out, index, image.filename)
            shutil.copyfile(stored, target)
        else:
            target = stored  # already in SD_OUTPUT_DIR, with its parameters embedded
        print(target)
        written += 1
    return 0 if written else 1


def _warn_flagged(index: int, seed: object) -> None:
    print(f"imagegen: image {index + 1} (seed {seed}) was flagged by the safety checker", file=sys.stderr)


# -- against a running service ----------------------------------------------------------------------


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else SD_API_KEY from the environment or .env (the service's own setting)."""
    if getattr(args, "api_key", None):
        return str(args.api_key)
    if os.environ.get("SD_API_KEY"):
        return os.environ["SD_API_KEY"]
    try:
        from imagegen.config import load_settings

        key = load_settings().api_key
    except Exception:  # noqa: BLE001 - an unrelated invalid setting must not stop a remote call
        return None
    return key.get_secret_value() if key is not None else None


def describe_response_error(response: Any) -> str:
    try:
        error = response.json()["error"]
        return f"HTTP {response.status_code} {error['type']}: {error['message']}"
    except Exception:  # noqa: BLE001 - not our envelope (a proxy's page)
        return f"HTTP {response.status_code}"


def _remote(args: argparse.Namespace, body: dict[str, Any]) -> int:
    import httpx

    if args.backend:
        body["backend"] = args.backend
    if args.model:
        body["model"] = args.model  # one of the server's models (`imagegen models list --url`)
    key = api_key(args)
    headers = {"X-API-Key": key} if key else {}
    base = args.url.rstrip("/")
    bar = ProgressBar("generate", enabled=not args.quiet)
    # No read timeout: the event stream is quiet while a model loads or a job waits in the queue.
    with httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(30.0, read=None)) as client:
        try:
            response = client.post("/api/jobs", json=body)
        except httpx.HTTPError as error:
            hint = f"is the service running? `imagegen health --url {base}`"
            return _fail(f"could not reach {base}: {type(error).__name__} ({hint})", 2)
        if response.status_code != 202:
            return _fail(describe_response_error(response), 2 if response.status_code < 500 else 1)
        job_id = response.json()["id"]
        try:
            job = _follow(client, job_id, bar)
        except KeyboardInterrupt:
            bar.close()
            client.post(f"/api/jobs/{job_id}/cancel")
            return _fail(f"interrupted: job {job_id} cancelled", 130)
        except httpx.HTTPError as error:
            return _fail(f"lost the connection to {base} while job {job_id} ran: {type(error).__name__}", 1)
        bar.close()
        if job.get("status") != "succeeded":
            failure = job.get("error") or {}
            return _fail(f"job {job_id} {job.get('status')}: {failure.get('type')}: {failure.get('message')}")
        written = 0
        for index, image in enumerate((job.get("result") or {}).get("images", [])):
            if image.get("nsfw") or not image.get("filename"):
                _warn_flagged(index, image.get("seed"))
                continue
            download = client.get(f"/api/images/{image['filename']}")
            if download.status_code != 200:
                return _fail(f"could not download {image['filename']}: {describe_response_error(download)}")
            target = destination(args.out, index, image["filename"])
            target.write_bytes(download.content)
            print(target)
            written += 1
        return 0 if written else 1


def _follow(client: Any, job_id: str, bar: ProgressBar) -> dict[str, Any]:
    """Follow the job's event stream to its final event; poll if the stream ends early."""
    position = None
    with client.stream("GET", f"/api/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as response:
        if response.status_code == 200:
            event, data = "message", []
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif line == "" and data:
                    payload: dict[str, Any] = json.loads("\n".join(data))
                    if event in FINAL:
                        return payload
                    if event == "progress":
                        bar.update(int(payload["step"]), int(payload["total"]))
                    elif event == "queued" and payload.get("queue_position") != position:
                        position = payload.get("queue_position")
                        bar.note(f"queued (position {position})")
                    event, data = "message", []
    while True:
        response = client.get(f"/api/jobs/{job_id}", params={"include_images": "false"})
        response.raise_for_status()
        job: dict[str, Any] = response.json()
        if job["status"] in FINAL:
            return job
        progress = job.get("progress") or {}
        bar.update(int(progress.get("step", 0)), int(progress.get("total", 0)))
        time.sleep(0.5)
