"""The fleet of workers as an API replica sees it, and the backends of a replica.

Workers heartbeat into `{prefix}:workers` (a JSON report each) and `{prefix}:workers:seen` (Redis's
clock). A replica refreshes its `Fleet` snapshot in the background (engine/distributed/engine.py),
so that health, availability and routing questions are answered from memory, without I/O.

`FleetBackend` wraps a real backend of the replica: validation, capabilities and defaults are the
real backend's (the replica never loads a model or opens a device), health and availability are the
fleet's: which live workers serve it, their models, devices and states (docs/scale-out.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from imagegen.backends.base import Availability, BackendHealth, BackendState, Capabilities, ImageBackend, RunContext
from imagegen.errors import BackendNotConfiguredError, BackendUnavailableError, ServiceError
from imagegen.generation import GeneratedImage, GenerationParams, GenerationRequest

#: Best first: the state a backend shows when several workers serve it.
_STATE_ORDER = (
    BackendState.READY,
    BackendState.LOADING,
    BackendState.ERROR,
    BackendState.UNAVAILABLE,
    BackendState.NOT_CONFIGURED,
)


def forget_seconds(lease: float) -> float:
    """How long a worker that stopped heartbeating still keeps its routes open (it may be restarting)."""
    return max(300.0, 10 * lease)


@dataclass(frozen=True)
class BackendReport:
    """One backend on one worker, as its heartbeat says."""

    state: BackendState
    reason: str
    models: tuple[str, ...]
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    loaded: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackendReport:
        try:
            state = BackendState(data.get("state"))
        except ValueError:
            state = BackendState.ERROR
        return cls(
            state=state,
            reason=str(data.get("reason", "")),
            models=tuple(str(model) for model in data.get("models", ())),
            model=data.get("model"),
            device=data.get("device"),
            dtype=data.get("dtype"),
            loaded=bool(data.get("loaded", False)),
        )


@dataclass(frozen=True)
class WorkerReport:
    name: str
    #: Redis time of the last heartbeat, and how long ago that was when the snapshot was taken.
    seen_at: float
    age: float
    host: str = ""
    pid: int = 0
    backends: dict[str, BackendReport] = field(default_factory=dict)
    lanes: dict[str, dict[str, int]] = field(default_factory=dict)
    running: tuple[str, ...] = ()
    probe: str | None = None
    batch_seconds: float | None = None

    @classmethod
    def parse(cls, name: str, payload: dict[str, Any], seen_at: float, age: float) -> WorkerReport:
        return cls(
            name=name,
            seen_at=seen_at,
            age=age,
            host=str(payload.get("host", "")),
            pid=int(payload.get("pid", 0)),
            backends={
                backend_id: BackendReport.from_dict(report)
                for backend_id, report in dict(payload.get("backends", {})).items()
            },
            lanes={str(lane): dict(values) for lane, values in dict(payload.get("lanes", {})).items()},
            running=tuple(str(job) for job in payload.get("running", ())),
            probe=payload.get("probe"),
            batch_seconds=payload.get("batch_seconds"),
        )

    def serves(self, backend_id: str, model: str | None = None) -> bool:
        report = self.backends.get(backend_id)
        return report is not None and (model is None or model in report.models)

    def describe(self, backend_id: str) -> dict[str, Any]:
        report = self.backends[backend_id]
        busy = sum(int(lane.get("busy", 0)) for lane in self.lanes.values())
        return {
            "name": self.name,
            "host": self.host,
            "state": report.state.value,
            "reason": report.reason,
            "models": list(report.models),
            "model": report.model,
            "device": report.device,
            "dtype": report.dtype,
            "loaded": report.loaded,
            "busy": busy,
            "running": len(self.running),
            "seen_seconds_ago": round(self.age, 1),
        }


class Fleet:
    """The last snapshot of the workers' heartbeats (refreshed by the replica's engine)."""

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self.workers: list[WorkerReport] = []
        #: Monotonic time of the last successful refresh; 0 before the first one.
        self.refreshed = 0.0
        #: Workers whose output probe file this replica cannot see in its SD_OUTPUT_DIR.
        self.unseen_outputs: list[str] = []

    def update(self, workers: Sequence[WorkerReport]) -> None:
        self.workers = list(workers)
        self.refreshed = time.monotonic()

    def _aged(self, worker: WorkerReport) -> float:
        """A worker's age now: its age at the snapshot plus the time since."""
        return worker.age + (time.monotonic() - self.refreshed if self.refreshed else 0.0)

    def live(self) -> list[WorkerReport]:
        return [worker for worker in self.workers if self._aged(worker) <= self.lease]

    def known(self) -> list[WorkerReport]:
        """Live workers and those that may come back (seen within the forget window)."""
        window = forget_seconds(self.lease)
        return [worker for worker in self.workers if self._aged(worker) <= window]

    def live_counts(self, backend_ids: Sequence[str]) -> dict[str, int]:
        live = self.live()
        return {backend_id: sum(1 for worker in live if worker.serves(backend_id)) for backend_id in backend_ids}

    def slots(self) -> int:
        return sum(int(lane.get("concurrency", 1)) for worker in self.live() for lane in worker.lanes.values())

    def batch_seconds(self) -> float | None:
        values = [worker.batch_seconds for worker in self.live() if worker.batch_seconds]
        return sum(values) / len(values) if values else None

    # -- what a replica answers from the snapshot -------------------------------------------------
    def backend_health(self, backend: ImageBackend) -> BackendHealth:
        live = [worker for worker in self.live() if worker.serves(backend.id)]
        model = backend.default_model_id()
        if not live:
            waiting = [worker.name for worker in self.known() if worker.serves(backend.id)]
            if waiting:
                reason = (
                    f"no live worker; {len(waiting)} worker(s) seen in the last "
                    f"{forget_seconds(self.lease):.0f} s may come back: jobs wait in the queue"
                )
            else:
                reason = f"no worker serves this backend (start one: imagegen worker --backend {backend.id})"
            return BackendHealth(BackendState.UNAVAILABLE, reason, model=model, details={"workers": []})
        best = min(live, key=lambda worker: _STATE_ORDER.index(worker.backends[backend.id].state))
        report = best.backends[backend.id]
        reasons = "; ".join(f"{worker.name}: {worker.backends[backend.id].reason}" for worker in live)
        return BackendHealth(
            report.state,
            f"{len(live)} live worker(s): {reasons}",
            model=model,
            device=report.device,
            dtype=report.dtype,
            loaded=any(worker.backends[backend.id].loaded for worker in live),
            details={"workers": [worker.describe(backend.id) for worker in live]},
        )

    def admission_error(self, backend_id: str, model: str | None) -> ServiceError | None:
        """Why a job for this backend and model cannot be admitted now, or None (it can: a worker
        serving its route is live or may come back). Without a model: the backend alone."""
        known = [worker for worker in self.known() if worker.serves(backend_id)]
        if not known:
            return BackendUnavailableError(
                f"no worker serves backend '{backend_id}' (start one: imagegen worker --backend {backend_id})",
                param="backend",
                headers={"Retry-After": str(max(1, round(self.lease)))},
            )
        if all(not Availability(worker.backends[backend_id].state, "").accepts_jobs for worker in known):
            reason = known[0].backends[backend_id].reason
            return BackendNotConfiguredError(
                f"backend '{backend_id}' cannot take jobs on any worker: {reason}", param="backend"
            )
        if model is not None and not any(worker.serves(backend_id, model) for worker in known):
            return BackendUnavailableError(
                f"no worker serves model '{model}' of backend '{backend_id}'",
                param="model",
                headers={"Retry-After": str(max(1, round(self.lease)))},
            )
        return None


class FleetBackend(ImageBackend):
    """A replica's view of a backend: the real class validates, the fleet runs and reports."""

    def __init__(self, inner: ImageBackend, fleet: Fleet) -> None:
        super().__init__(inner.settings)
        self.inner = inner
        self.fleet = fleet
        self.id = inner.id
        self.lane = inner.lane
        self.concurrency = inner.concurrency

    @property  # the wrapped backend's runtime default (A1111's checkpoint choice)
    def default_model(self) -> str | None:
        return self.inner.default_model

    @default_model.setter
    def default_model(self, value: str | None) -> None:
        self.inner.default_model = value

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()

    def capabilities_for(self, model: str) -> Capabilities:
        return self.inner.capabilities_for(model)

    def default_model_id(self) -> str:
        return self.inner.default_model_id()

    def model_for(self, requested: str | None) -> str:
        return self.inner.model_for(requested)

    def resolve(self, params: GenerationParams) -> GenerationRequest:
        return self.inner.resolve(params)

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def health(self) -> BackendHealth:
        return self.fleet.backend_health(self.inner)

    def availability(self) -> Availability:
        health = self.health()
        return Availability(health.state, health.reason)

    async def generate(self, batch: Sequence[GenerationRequest], ctx: RunContext) -> list[list[GeneratedImage]]:
        raise RuntimeError("an API replica never runs jobs: workers do (docs/scale-out.md)")
