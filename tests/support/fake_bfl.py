"""A fake Black Forest Labs API for tests, benchmarks and offline development.

It follows BFL's API (docs/flux-api.md): `POST /v1/<model>` with `x-key` returns an id and a
`polling_url`; `GET <polling_url>` says Pending (with `progress`) for a configurable time, then Ready
with a signed `sample` URL that expires; `GET /v1/credits`. It enforces the key, per-model
parameter rules (FastAPI-style 422 details), the account's active-task limit (429; 6 for
flux-kontext-max), credits (402), and records what it saw so tests can check the client's manners.
It is deliberately stricter than BFL where BFL would silently ignore a field (e.g. `steps` on klein),
so that a client bug shows up as an error.

Words in the prompt pick an outcome, so a server in another process needs no wiring:
  moderate-input   Request Moderated (at once, nothing charged)
  moderate-output  Content Moderated (after the generation time)
  fail-task        Error
  lose-task        Task not found
  corrupt-result   Ready, but the sample URL serves bytes that are not an image
  redirect-loop    Ready, but the sample URL redirects to itself, for ever
  slow-task        ten times the generation time
Tests can also inject HTTP answers per route with `FakeBFL.inject(...)`.

Run it:  python -m tests.support.fake_bfl --port 8787 --key bfl_dev-key --generation-time 1.0
then point the service at it:  SD_BFL_API_URL=http://127.0.0.1:8787 SD_BFL_API_KEY=bfl_dev-key

Deliberately independent of imagegen: it stands in for a third party.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import io
import json
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULT_KEY = "bfl_fake-dev-key"

# model -> (size multiple, min side, max side, max pixels, steps range, guidance range, max safety, mode)
_FLUX2 = dict(multiple=16, low=64, high=4096, pixels=2048 * 2048, steps=None, guidance=None, safety=5, mode="size")
_FLUX1 = dict(multiple=32, low=256, high=1440, pixels=1440 * 1440, steps=None, guidance=None, safety=6, mode="size")
MODEL_RULES: dict[str, dict[str, Any]] = {
    "flux-2-klein-4b": {**_FLUX2, "references": 4},
    "flux-2-klein-9b": {**_FLUX2, "references": 4},
    "flux-2-pro": {**_FLUX2, "references": 8},
    "flux-2-max": {**_FLUX2, "references": 8},
    "flux-2-flex": {**_FLUX2, "steps": (1, 50), "guidance": (1.5, 10.0), "references": 8},
    "flux-kontext-pro": {**_FLUX1, "mode": "aspect_ratio", "references": 1},
    "flux-kontext-max": {**_FLUX1, "mode": "aspect_ratio", "max_active": 6, "references": 1},
    # FLUX.1 Fill [pro]: image + mask (white = repaint), answered at the image's size.
    "flux-pro-1.0-fill": {**_FLUX1, "mode": "fill", "steps": (15, 50), "guidance": (1.5, 100.0)},
    "flux-pro-1.1": _FLUX1,
    "flux-pro-1.1-ultra": {**_FLUX1, "mode": "aspect_ratio"},
    "flux-pro": {**_FLUX1, "steps": (1, 50), "guidance": (1.5, 5.0)},
    "flux-dev": {**_FLUX1, "steps": (1, 50), "guidance": (1.5, 5.0)},
}
_COMMON_FIELDS = {
    "prompt",
    "seed",
    "safety_tolerance",
    "output_format",
    "prompt_upsampling",
    "webhook_url",
    "webhook_secret",
    "raw",
}


def reference_fields(count: int) -> list[str]:
    return ["input_image" if index == 0 else f"input_image_{index + 1}" for index in range(count)]


def decode_input(value: Any) -> Image.Image | None:
    """An input image field (base64 PNG/JPEG/WebP) as an image; None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        image = Image.open(io.BytesIO(base64.b64decode(value, validate=True)))
        image.load()
    except Exception:  # noqa: BLE001 - anything that is not an image is answered 422
        return None
    return image


# Size of the image an aspect_ratio model returns (about 1 MP; Ultra about 4 MP, kept small here).
_ASPECT_PIXELS = 512 * 512


def pixels_for(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """The fake's "generation": a colour from (prompt, seed) with the seed in the first 4 red values,
    so a test can tell from the image alone which seed it belongs to."""
    digest = hashlib.sha256(f"{prompt}|{seed}|{width}x{height}".encode()).digest()
    image = Image.new("RGB", (width, height), tuple(digest[:3]))
    for index, byte in enumerate(int(seed).to_bytes(8, "little")[:4]):
        image.putpixel((index, 0), (byte, digest[3], digest[4]))
    return image


def seed_in(image: Image.Image) -> int:
    rgb = image.convert("RGB")
    return int.from_bytes(bytes(rgb.getpixel((index, 0))[0] for index in range(4)), "little")


@dataclass
class Injected:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Task:
    id: str
    model: str
    body: dict[str, Any]
    created: float
    ready_at: float
    outcome: str  # ready | request_moderated | content_moderated | error | lost
    seed: int
    width: int
    height: int
    output_format: str
    corrupt: bool = False
    redirect_loop: bool = False
    sample_expires: float | None = None  # wall clock, set when first reported Ready
    rendered: asyncio.Future[bytes] | None = None  # the result bytes, made during the generation time


class FakeBFL:
    """The state and the ASGI app. Thread-safe: the app runs in uvicorn's thread, tests read from theirs."""

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_KEY,
        generation_time: float = 1.0,
        result_ttl: float = 600.0,
        max_active: int = 24,
        credits: float = 1000.0,
        cost: float = 1.0,
        report_progress: bool = True,
        polling_base: str | None = None,
        delivery_base: str | None = None,
        chunked_results: bool = False,
        result_padding: int = 0,
        submit_delay: float = 0.0,
        fixed_progress: float | None = None,
    ) -> None:
        self.api_key = api_key
        self.generation_time = generation_time
        self.result_ttl = result_ttl
        self.max_active = max_active
        self.credits = credits
        self.cost = cost
        self.report_progress = report_progress
        #: Where polling URLs / sample URLs point; None: the host the request came to.
        self.polling_base = polling_base
        self.delivery_base = delivery_base
        self.chunked_results = chunked_results
        self.result_padding = result_padding
        #: Seconds the answer to a submit takes after the task was created (a lost or slow answer).
        self.submit_delay = submit_delay
        #: Report this progress while Pending instead of the true fraction (e.g. 0.99: a stalled task).
        self.fixed_progress = fixed_progress
        self._sign_key = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self.tasks: dict[str, Task] = {}
        self._injected: dict[str, deque[Injected]] = {}
        # What it saw.
        self.requests: list[dict[str, Any]] = []  # {"route", "method", "path", "headers", "time"}
        self.submits: list[dict[str, Any]] = []
        self.max_active_seen = 0
        self.rejected_busy = 0
        self.app = Starlette(
            routes=[
                Route("/v1/credits", self._credits, methods=["GET"]),
                Route("/v1/get_result", self._get_result, methods=["GET"]),
                Route("/v1/{model}", self._submit, methods=["POST"]),
                Route("/results/{task_id}/sample.{ext}", self._sample, methods=["GET"]),
                Route("/{path:path}", self._not_found, methods=["GET", "POST", "PUT", "DELETE"]),
            ]
        )

    # -- test controls ---------------------------------------------------------------------------
    def inject(
        self, route: str, status: int, *, times: int = 1, body: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        """The next `times` requests to `route` (submit | poll | sample | credits) get this answer."""
        with self._lock:
            queue = self._injected.setdefault(route, deque())
            for _ in range(times):
                queue.append(Injected(status, body, dict(headers or {})))

    def active(self, now: float | None = None, model: str | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            return sum(
                1 for task in self.tasks.values() if task.ready_at > now and (model is None or task.model == model)
            )

    def count(self, route: str) -> int:
        with self._lock:
            return sum(1 for item in self.requests if item["route"] == route)

    def seen_headers(self, route: str) -> list[dict[str, str]]:
        with self._lock:
            return [item["headers"] for item in self.requests if item["route"] == route]

    # -- helpers ---------------------------------------------------------------------------------
    def _record(self, route: str, request: Request) -> None:
        with self._lock:
            self.requests.append(
                {
                    "route": route,
                    "method": request.method,
                    "path": request.url.path,
                    "headers": dict(request.headers),
                    "time": time.monotonic(),
                }
            )

    def _take_injected(self, route: str) -> Response | None:
        with self._lock:
            queue = self._injected.get(route)
            injected = queue.popleft() if queue else None
        if injected is None:
            return None
        body = injected.body if injected.body is not None else {"detail": f"injected HTTP {injected.status}"}
        return JSONResponse(body, status_code=injected.status, headers=injected.headers)

    def _key_ok(self, request: Request) -> bool:
        given = request.headers.get("x-key", "")
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def _base(self, request: Request, override: str | None) -> str:
        return (override or str(request.base_url)).rstrip("/")

    def _signature(self, task_id: str, expires: int) -> str:
        return hmac.new(self._sign_key, f"{task_id}|{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    @staticmethod
    def _invalid(loc: str, message: str, value: Any) -> JSONResponse:
        # The shape FastAPI gives (and BFL answers with): a list with loc, msg, type and the input.
        return JSONResponse(
            {"detail": [{"type": "value_error", "loc": ["body", loc], "msg": message, "input": value}]},
            status_code=422,
        )

    def _validate(self, model: str, body: Any) -> JSONResponse | None:
        if not isinstance(body, dict):
            return self._invalid("body", "Input should be a valid dictionary", None)
        rules = MODEL_RULES[model]
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return self._invalid("prompt", "Field required", prompt)
        allowed = set(_COMMON_FIELDS) | set(reference_fields(rules.get("references", 0)))
        if rules["mode"] == "size":
            allowed |= {"width", "height"}
        elif rules["mode"] == "aspect_ratio":
            allowed |= {"aspect_ratio"}
        else:
            allowed |= {"image", "mask"}
        if rules["steps"]:
            allowed |= {"steps", "guidance", "interval"}
        for name in body:
            if name not in allowed:
                return self._invalid(name, f"Extra inputs are not permitted for {model}", body[name])
        for name in reference_fields(rules.get("references", 0)):
            if name in body and decode_input(body[name]) is None:
                return self._invalid(name, "must be a base64 encoded image", None)
        if rules["mode"] == "fill":
            image, mask = decode_input(body.get("image")), decode_input(body.get("mask"))
            if image is None:
                return self._invalid("image", "must be a base64 encoded image", None)
            if mask is None or mask.size != image.size:
                return self._invalid("mask", "must be an image of the same size as image", None)
        elif rules["mode"] == "size":
            for name in ("width", "height"):
                value = body.get(name, 1024)
                if (
                    not isinstance(value, int)
                    or value % rules["multiple"]
                    or not rules["low"] <= value <= rules["high"]
                ):
                    return self._invalid(
                        name,
                        f"must be a multiple of {rules['multiple']} between {rules['low']} and {rules['high']}",
                        value,
                    )
            if body.get("width", 1024) * body.get("height", 1024) > rules["pixels"]:
                return self._invalid("width", "image too large", body.get("width"))
        else:
            ratio = body.get("aspect_ratio", "16:9")
            try:
                width, height = (int(part) for part in str(ratio).split(":"))
                if not 9 / 21 <= width / height <= 21 / 9:
                    raise ValueError
            except (ValueError, ZeroDivisionError):
                return self._invalid("aspect_ratio", "aspect ratio must be between 21:9 and 9:21", ratio)
        for name, bounds in (("steps", rules["steps"]), ("guidance", rules["guidance"])):
            if bounds and name in body and not bounds[0] <= body[name] <= bounds[1]:
                return self._invalid(name, f"must be between {bounds[0]} and {bounds[1]}", body[name])
        tolerance = body.get("safety_tolerance", 2)
        if not isinstance(tolerance, int) or not 0 <= tolerance <= rules["safety"]:
            return self._invalid("safety_tolerance", f"must be between 0 and {rules['safety']}", tolerance)
        if body.get("output_format", "jpeg") not in ("jpeg", "png"):
            return self._invalid("output_format", "must be 'jpeg' or 'png'", body.get("output_format"))
        return None

    # -- routes ----------------------------------------------------------------------------------
    async def _submit(self, request: Request) -> Response:
        self._record("submit", request)
        if (injected := self._take_injected("submit")) is not None:
            return injected
        if not self._key_ok(request):
            return JSONResponse({"detail": "Invalid or missing API key"}, status_code=401)
        model = request.path_params["model"]
        if model not in MODEL_RULES:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse(
                {"detail": [{"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error"}]}, status_code=422
            )
        if (invalid := self._validate(model, body)) is not None:
            return invalid
        prompt: str = body["prompt"]
        now = time.monotonic()
        with self._lock:
            if self.credits < self.cost:
                return JSONResponse({"detail": "Insufficient credits"}, status_code=402)
            active = sum(1 for task in self.tasks.values() if task.ready_at > now)
            model_limit = MODEL_RULES[model].get("max_active")
            model_active = sum(1 for task in self.tasks.values() if task.ready_at > now and task.model == model)
            if active >= self.max_active or (model_limit is not None and model_active >= model_limit):
                self.rejected_busy += 1
                return JSONResponse({"detail": "Too many active tasks"}, status_code=429)
            if "moderate-input" in prompt:
                outcome, duration = "request_moderated", 0.0
            else:
                outcome = (
                    "content_moderated"
                    if "moderate-output" in prompt
                    else "error"
                    if "fail-task" in prompt
                    else "lost"
                    if "lose-task" in prompt
                    else "ready"
                )
                duration = self.generation_time * (10 if "slow-task" in prompt else 1)
            if MODEL_RULES[model]["mode"] == "size":
                width, height = body.get("width", 1024), body.get("height", 1024)
            elif MODEL_RULES[model]["mode"] == "fill":
                width, height = decode_input(body["image"]).size  # type: ignore[union-attr]
            else:
                ratio_w, ratio_h = (int(part) for part in str(body.get("aspect_ratio", "16:9")).split(":"))
                scale = (_ASPECT_PIXELS / (ratio_w * ratio_h)) ** 0.5
                width, height = max(16, round(ratio_w * scale / 16) * 16), max(16, round(ratio_h * scale / 16) * 16)
            seed = body.get("seed")
            task = Task(
                id=str(uuid.uuid4()),
                model=model,
                body=dict(body),
                created=now,
                ready_at=now + duration,
                outcome=outcome,
                seed=int(seed) if isinstance(seed, int) else secrets.randbelow(2**32),
                width=width,
                height=height,
                output_format=body.get("output_format", "jpeg"),
                corrupt="corrupt-result" in prompt,
                redirect_loop="redirect-loop" in prompt,
            )
            self.tasks[task.id] = task
            if outcome == "ready" and not task.corrupt:
                # Like BFL, the image exists by the time the task is Ready: render it in a worker thread
                # now, not when the download arrives (24 downloads at once would otherwise queue here).
                task.rendered = asyncio.ensure_future(asyncio.to_thread(self._render, task))
            if outcome != "request_moderated":
                self.credits -= self.cost  # moderated requests are not charged
            self.submits.append({"model": model, "body": dict(body), "id": task.id})
            self.max_active_seen = max(self.max_active_seen, active + (1 if duration > 0 else 0))
        if self.submit_delay:
            await asyncio.sleep(self.submit_delay)
        base = self._base(request, self.polling_base)
        return JSONResponse(
            {
                "id": task.id,
                "polling_url": f"{base}/v1/get_result?id={task.id}",
                "cost": self.cost,
                "input_mp": 0.0,
                "output_mp": round(width * height / 1e6, 2),
            }
        )

    async def _get_result(self, request: Request) -> Response:
        self._record("poll", request)
        if (injected := self._take_injected("poll")) is not None:
            return injected
        if not self._key_ok(request):
            return JSONResponse({"detail": "Invalid or missing API key"}, status_code=401)
        task_id = request.query_params.get("id", "")
        with self._lock:
            task = self.tasks.get(task_id)
        if task is None or task.outcome == "lost":
            return JSONResponse(
                {
                    "id": task_id,
                    "status": "Task not found",
                    "result": None,
                    "progress": None,
                    "details": None,
                    "preview": None,
                }
            )
        now = time.monotonic()
        body: dict[str, Any] = {"id": task.id, "result": None, "progress": None, "details": None, "preview": None}
        if now < task.ready_at:
            body["status"] = "Pending"
            if self.fixed_progress is not None:
                body["progress"] = self.fixed_progress
            elif self.report_progress:
                body["progress"] = round(min(0.99, (now - task.created) / (task.ready_at - task.created)), 3)
            return JSONResponse(body)
        if task.outcome == "request_moderated":
            body.update(status="Request Moderated", details={"Moderation Reasons": ["fake: prompt word"]})
        elif task.outcome == "content_moderated":
            body.update(status="Content Moderated", details={"Moderation Reasons": ["fake: output flagged"]})
        elif task.outcome == "error":
            body.update(status="Error", details={"error": "fake generation failure"})
        else:
            with self._lock:
                if task.sample_expires is None:
                    task.sample_expires = time.time() + self.result_ttl
            expires = int(task.sample_expires * 1000)
            ext = "png" if task.output_format == "png" else "jpeg"
            base = self._base(request, self.delivery_base)
            sample = f"{base}/results/{task.id}/sample.{ext}?se={expires}&sig={self._signature(task.id, expires)}"
            body.update(
                status="Ready",
                progress=1.0,
                result={
                    "sample": sample,
                    "seed": task.seed,
                    "prompt": task.body["prompt"],
                    "start_time": task.created,
                    "end_time": task.ready_at,
                    "duration": task.ready_at - task.created,
                },
            )
        return JSONResponse(body)

    async def _sample(self, request: Request) -> Response:
        self._record("sample", request)
        if (injected := self._take_injected("sample")) is not None:
            return injected
        task_id = request.path_params["task_id"]
        expires = request.query_params.get("se", "")
        signature = request.query_params.get("sig", "")
        with self._lock:
            task = self.tasks.get(task_id)
        valid = (
            task is not None
            and expires.isdigit()
            and hmac.compare_digest(signature, self._signature(task_id, int(expires)))
        )
        if not valid:
            return Response(
                "<Error><Code>AuthenticationFailed</Code></Error>", status_code=403, media_type="application/xml"
            )
        if time.time() * 1000 > int(expires):
            # What a signed blob URL answers once its time is up.
            return Response(
                "<Error><Code>AuthenticationFailed</Code><Message>Signed expiry time has passed</Message></Error>",
                status_code=403,
                media_type="application/xml",
            )
        assert task is not None
        if task.redirect_loop:
            return RedirectResponse(str(request.url), status_code=302)
        if task.corrupt or task.rendered is None:
            data, media = b"this is not an image" * 10, "image/png"
        else:
            data = await task.rendered + b"\0" * self.result_padding
            media = "image/png" if task.output_format == "png" else "image/jpeg"
        if self.chunked_results:

            async def chunks() -> Any:
                for start in range(0, len(data), 65536):
                    yield data[start : start + 65536]
                    await asyncio.sleep(0)

            return StreamingResponse(chunks(), media_type=media)  # no Content-Length
        return Response(data, media_type=media)

    @staticmethod
    def _render(task: Task) -> bytes:
        image = pixels_for(task.body["prompt"], task.seed, task.width, task.height)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if task.output_format == "png" else "JPEG", quality=95)
        return buffer.getvalue()

    async def _credits(self, request: Request) -> Response:
        self._record("credits", request)
        if (injected := self._take_injected("credits")) is not None:
            return injected
        if not self._key_ok(request):
            return JSONResponse({"detail": "Invalid or missing API key"}, status_code=401)
        with self._lock:
            return JSONResponse({"credits": self.credits})

    async def _not_found(self, request: Request) -> Response:
        self._record("other", request)
        return JSONResponse({"detail": "Not Found"}, status_code=404)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="A fake BFL API on loopback (see the module docstring).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--key", default=DEFAULT_KEY, help="the x-key it accepts")
    parser.add_argument("--generation-time", type=float, default=1.0, help="seconds a task stays Pending")
    parser.add_argument("--result-ttl", type=float, default=600.0, help="seconds a sample URL stays valid")
    parser.add_argument("--max-active", type=int, default=24, help="active tasks before 429")
    parser.add_argument("--credits", type=float, default=1000.0)
    parser.add_argument("--no-progress", action="store_true", help="report progress: null while Pending")
    args = parser.parse_args(argv)
    fake = FakeBFL(
        api_key=args.key,
        generation_time=args.generation_time,
        result_ttl=args.result_ttl,
        max_active=args.max_active,
        credits=args.credits,
        report_progress=not args.no_progress,
    )
    print(f"fake BFL API on http://{args.host}:{args.port} (x-key: {args.key})", flush=True)
    # Idle connections kept 75 s, as the proxies in front of real APIs do (nginx's default), not
    # uvicorn's 5 s.
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=75)


if __name__ == "__main__":
    main()
