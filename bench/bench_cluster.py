"""Distributed mode (docs/scale-out.md) on this machine: a real Redis server, one API replica and
worker processes running the fake backend, which sleeps per step (it releases the CPU, as a GPU-bound
worker leaves the host's CPU idle), so that scaling shows on 2 cores.

- throughput with N workers / one worker, 48 jobs (N = 2 and 4; target >= 0.9 x N);
- one distributed worker / the embedded engine, the same 48 jobs (target >= 0.95);
- progress latency, from the fake's step (its step log) to the SSE event at the API (p95 < 50 ms);
- SIGKILL of one of 4 workers during 48 jobs: none lost, none finalized twice, reclaim <= lease + 1 s;
- SIGKILL and restart of Redis (appendonly yes) during 48 jobs: no accepted job lost.

Jobs are 64x64, 10 steps of 40 ms, SD_MAX_BATCH=1 (one job per call: this measures how jobs spread
over workers, not batching, which both engines do the same way).
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.support.process import SERVE_FAKE, ServiceProcess, WorkerProcess
from tests.support.redis_server import RedisServer

JOBS = 48
STEPS = 10
STEP_DELAY = 0.04
LEASE = 2.0


def _env(folder: Path, url: str | None, **extra: str) -> dict[str, str]:
    env = {
        "FAKE_STEP_DELAY": str(STEP_DELAY),
        "FAKE_DEFAULT_STEPS": str(STEPS),
        "SD_MAX_BATCH": "1",
        "SD_MAX_QUEUE": "200",
        "SD_WORKER_LEASE_SECONDS": str(LEASE),
        "SD_OUTPUT_DIR": str(folder / "outputs"),
        **extra,
    }
    if url is not None:
        env["SD_REDIS_URL"] = url
    return env


async def _burst(base: str, count: int, label: str) -> float:
    """`count` synchronous generations at once; seconds until the last answer."""
    limits = httpx.Limits(max_connections=count + 4)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        started = time.perf_counter()
        answers = await asyncio.gather(
            *(http.post("/api/txt2img", json={"prompt": f"{label} {i}", "seed": i}) for i in range(count))
        )
        elapsed = time.perf_counter() - started
    failed = [answer.status_code for answer in answers if answer.status_code != 200]
    assert not failed, f"{label}: {failed}"
    return elapsed


def _final_events(url: str, prefix: str, stop: threading.Event, into: list[tuple[float, str, str]]) -> None:
    """Every job event of the cluster, timestamped (final states counted per job: finalized once?)."""
    conn = redis.Redis.from_url(url, decode_responses=True)
    pubsub = conn.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("{" + prefix + "}:events")
    while not stop.is_set():
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            event = json.loads(message["data"])
            into.append((time.time(), event["job"], event["event"]))
    pubsub.close()
    conn.close()


def _scaling(rows: list[dict[str, Any]]) -> None:
    root = Path(tempfile.mkdtemp(prefix="imagegen-bench-cluster-"))
    with ServiceProcess(root / "embedded", command=SERVE_FAKE, **_env(root / "embedded", None)) as embedded:
        asyncio.run(_burst(embedded.url, 2, "warm"))
        embedded_seconds = asyncio.run(_burst(embedded.url, JOBS, "embedded"))
    with RedisServer() as server:
        folder = root / "cluster"
        env = _env(folder, server.url)
        workers = [WorkerProcess(folder, **env).start()]
        with ServiceProcess(folder, command=SERVE_FAKE, **env) as api:
            asyncio.run(_burst(api.url, 2, "warm"))
            seconds = {1: asyncio.run(_burst(api.url, JOBS, "one"))}
            for count in (2, 4):
                while len(workers) < count:
                    workers.append(WorkerProcess(folder, **env).start())
                time.sleep(2 * LEASE / 3)  # every worker in the replica's fleet snapshot
                seconds[count] = asyncio.run(_burst(api.url, JOBS, f"n{count}"))
            for worker in workers:
                worker.stop()
            _latency(rows, api, folder, env)
    ideal = JOBS * STEPS * STEP_DELAY
    for count in (2, 4):
        speedup = seconds[1] / seconds[count]
        rows.append(
            {
                "metric": f"throughput {count} workers / 1 worker ({JOBS} jobs)",
                "value": speedup,
                "unit": "x",
                "target": f">= {0.9 * count:.1f}",
                "met": speedup >= 0.9 * count,
                "detail": f"{seconds[1]:.2f} s with 1 worker, {seconds[count]:.2f} s with {count} "
                f"(pure step time {ideal:.1f} s / {count} = {ideal / count:.2f} s)",
            }
        )
    ratio = embedded_seconds / seconds[1]
    rows.append(
        {
            "metric": "distributed 1 worker / embedded engine (throughput)",
            "value": ratio,
            "unit": "x",
            "target": ">= 0.95",
            "met": ratio >= 0.95,
            "detail": f"{JOBS} jobs: embedded {embedded_seconds:.2f} s, one worker {seconds[1]:.2f} s "
            f"(pure step time {ideal:.2f} s)",
        }
    )


def _latency(rows: list[dict[str, Any]], api: ServiceProcess, folder: Path, env: dict[str, str]) -> None:
    """Worker step (the fake's step log, same clock) to the SSE event read at the API."""
    log = folder / "steps.log"
    watcher = WorkerProcess(folder, **{**env, "FAKE_STEP_LOG": str(log), "FAKE_STEP_DELAY": "0.05"}).start()
    received: dict[tuple[str, int], float] = {}
    with httpx.Client(base_url=api.url, timeout=60) as client:
        for index in range(10):
            job = client.post("/api/jobs", json={"prompt": f"latency {index}", "steps": 20}).json()
            with client.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
                event = ""
                for line in stream.iter_lines():
                    if line.startswith("event:"):
                        event = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and event == "progress":
                        step = json.loads(line.split(":", 1)[1])["step"]
                        received[(job["id"], step)] = time.time()
                    elif line.startswith("data:") and event in ("succeeded", "failed", "cancelled"):
                        break
    watcher.stop()
    delays = []
    for line in log.read_text().splitlines() if log.exists() else []:
        ids, step, at = line.split()
        for job_id in ids.split(","):
            if (job_id, int(step)) in received:
                delays.append((received[(job_id, int(step))] - float(at)) * 1000)
    delays.sort()
    p95 = delays[int(0.95 * (len(delays) - 1))] if delays else float("nan")
    rows.append(
        {
            "metric": "progress latency, worker step -> SSE at the API (p95)",
            "value": p95,
            "unit": "ms",
            "target": "< 50 ms",
            "met": bool(delays) and p95 < 50,
            "detail": f"{len(delays)} steps of 10 jobs watched one after another, "
            f"median {statistics.median(delays) if delays else float('nan'):.1f} ms, max "
            f"{max(delays) if delays else float('nan'):.1f} ms",
        }
    )


def _kill_a_worker(rows: list[dict[str, Any]]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="imagegen-bench-kill-"))
    prefix = "bench-kill"
    with RedisServer() as server:
        env = _env(folder, server.url, SD_REDIS_PREFIX=prefix)
        workers = [WorkerProcess(folder, **env).start() for _ in range(4)]
        events: list[tuple[float, str, str]] = []
        stop = threading.Event()
        listener = threading.Thread(target=_final_events, args=(server.url, prefix, stop, events))
        listener.start()
        with ServiceProcess(folder, command=SERVE_FAKE, **env) as api, httpx.Client(base_url=api.url) as client:
            ids = [client.post("/api/jobs", json={"prompt": f"kill {i}", "seed": i}).json()["id"] for i in range(JOBS)]
            time.sleep(1.0)
            workers[0].kill(signal.SIGKILL)
            killed = time.time()
            deadline = time.monotonic() + 120
            statuses: Counter[str] = Counter()
            while time.monotonic() < deadline:
                statuses = Counter(client.get(f"/api/jobs/{job_id}").json()["status"] for job_id in ids)
                if statuses["succeeded"] + statuses["failed"] + statuses["cancelled"] == JOBS:
                    break
                time.sleep(0.25)
            time.sleep(0.5)
        stop.set()
        listener.join()
        for worker in workers[1:]:
            worker.stop()
    finals = Counter(job for _, job, event in events if event in ("succeeded", "failed", "cancelled"))
    twice = sum(1 for count in finals.values() if count > 1)
    requeued = [at for at, _, event in events if event == "queued" and at > killed]
    reclaim = max(requeued) - killed if requeued else float("nan")
    lost = JOBS - statuses["succeeded"]
    ok = lost == 0 and twice == 0 and bool(requeued) and reclaim <= LEASE + 1
    rows.append(
        {
            "metric": "SIGKILL 1 of 4 workers during 48 jobs: lost / finalized twice / reclaim",
            "value": reclaim,
            "unit": "s",
            "target": f"0 / 0 / <= {LEASE + 1:g} s (lease {LEASE:g} s)",
            "met": ok,
            "detail": f"{lost} lost, {twice} finalized twice, {len(requeued)} job(s) taken over, the last back in "
            f"its queue {reclaim:.2f} s after the kill",
        }
    )


def _restart_redis(rows: list[dict[str, Any]]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="imagegen-bench-redis-"))
    server = RedisServer(folder / "redis").start()
    try:
        env = _env(folder, server.url)
        workers = [WorkerProcess(folder, **env).start() for _ in range(2)]
        with ServiceProcess(folder, command=SERVE_FAKE, **env) as api, httpx.Client(base_url=api.url) as client:
            accepted = []
            refused = Counter[int]()
            down = time.monotonic()
            for index in range(JOBS):
                if index == 16:
                    server.kill(signal.SIGKILL)
                    down = time.monotonic()
                if index == 32:
                    while time.monotonic() - down < 1.0:
                        time.sleep(0.05)
                    server.start()
                answer = client.post("/api/jobs", json={"prompt": f"restart {index}", "seed": index})
                if answer.status_code == 202:
                    accepted.append(answer.json()["id"])
                else:
                    refused[answer.status_code] += 1
                time.sleep(0.05)
            deadline = time.monotonic() + 120
            done: Counter[str] = Counter()
            while time.monotonic() < deadline:
                try:
                    done = Counter(client.get(f"/api/jobs/{job_id}").json()["status"] for job_id in accepted)
                except (httpx.HTTPError, KeyError):
                    done = Counter()
                if done["succeeded"] == len(accepted):
                    break
                time.sleep(0.25)
        for worker in workers:
            worker.stop()
    finally:
        server.kill()
    lost = len(accepted) - done["succeeded"]
    rows.append(
        {
            "metric": "SIGKILL + restart of Redis during 48 submissions: accepted jobs lost",
            "value": float(lost),
            "unit": "jobs",
            "target": "0",
            "met": lost == 0 and set(refused) <= {503},
            "detail": f"{len(accepted)} accepted (202), {sum(refused.values())} refused while Redis was down "
            f"({dict(refused)}: 503 + Retry-After), {done['succeeded']} of the accepted succeeded",
        }
    )


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    _scaling(rows)
    _kill_a_worker(rows)
    _restart_redis(rows)
    return rows
