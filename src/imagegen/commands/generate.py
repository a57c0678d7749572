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
        return args.format
    if args.out:
        suffix = Path(args.out).suffix.lower()
        if suffix not in FORMAT_BY_SUFFIX:
            raise ValueError(f"--out must end in .png, .jpg, .jpeg or .webp (or pass --format), not '{suffix}'")
        return FORMAT_BY_SUFFIX[suffix]
    return "png"


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The native API's request body (the in-process path builds the same GenerationParams from it)."""
    body: dict[str, Any] = {"prompt": args.prompt, "output_format": output_format(args), "num_images": args.num_images}
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
    return body


def destination(out: str | None, index: int, server_name: str) -> Path:
    """--out for the first image, `stem-2.ext`, `stem-3.ext`... for the next; the server's name without --out."""
    if not out:
        return Path(server_name)
    path = Path(out)
    return path if index == 0 else path.with_name(f"{path.stem}-{index + 1}{path.suffix}")


def run(args: argparse.Namespace) -> int:
    try:
        body = request_body(args)
    except ValueError as error:
        return _fail(str(error), 2)
    if args.url:
        return _remote(args, body)
    import asyncio

    from imagegen.config import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as error:
        return _fail(str(error), 2)
    return asyncio.run(_in_process(args, body, settings))


# -- in this process --------------------------------------------------------------------------------


async def _in_process(args: argparse.Namespace, body: dict[str, Any], settings: Any) -> int:
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
            settings, store=SQLiteJobStore(":memory:"), default_backend=args.backend, upkeep=False
        )
    except ValueError:
        from imagegen.backends.registry import DEFAULT_FACTORIES

        return _fail(f"unknown backend; known backends: {', '.join(DEFAULT_FACTORIES)}", 2)
    engine, events, outputs = services.engine, services.events, services.outputs
    bar = ProgressBar("generate", enabled=not args.quiet)
    try:
        await services.start()
        backend = services.registry.get(args.backend)
        if backend.health().state is BackendState.LOADING:
            bar.note(f"loading {backend.health().model} (first use: a download may take minutes)")
        params = GenerationParams(**{key: value for key, value in body.items() if key != "backend"})
        job = await engine.submit(params, backend.id)
        queue = events.subscribe(job.id)  # before the first await: no event of this job is missed
        while True:
            event = await queue.get()
            if event.event == "progress":
                bar.update(int(event.data["step"]), int(event.data["total"]))
            elif event.final:
                break
        bar.close()
        job = engine.get(job.id)
        if job.status is not JobStatus.SUCCEEDED:
            error = job.error or {}
            return _fail(f"{error.get('type', job.status.value)}: {error.get('message', 'the job did not succeed')}")
        return _write_local(args, job.result, outputs.root)
    except ServiceError as error:
        bar.close()
        return _fail(f"{error.error_type}: {error.message}", 2 if error.status_code < 500 else 1)
    finally:
        await services.stop(grace=0)


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
            error = job.get("error") or {}
            return _fail(f"job {job_id} {job.get('status')}: {error.get('type')}: {error.get('message')}")
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
                    payload = json.loads("\n".join(data))
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
        job = response.json()
        if job["status"] in FINAL:
            return job
        progress = job.get("progress") or {}
        bar.update(int(progress.get("step", 0)), int(progress.get("total", 0)))
        time.sleep(0.5)
