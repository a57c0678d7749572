"""Whether a local backend takes jobs is read cheaply (no memory probe) before every job, and a local
backend whose torch/diffusers are missing refuses jobs with a 4xx: an install problem no retry fixes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from imagegen.backends.base import Availability, BackendState
from imagegen.backends.local import support
from imagegen.backends.local.sd import StableDiffusionBackend
from imagegen.config import Settings
from tests.support.fake_backend import FakeBackend


def test_availability_reads_the_state_without_the_health_report(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = StableDiffusionBackend(make_settings())

    def probe(*_: Any) -> Any:
        raise AssertionError("memory probed")

    monkeypatch.setattr(support, "memory_in_use", probe)
    with pytest.raises(AssertionError, match="memory probed"):
        backend.health()  # the full report probes memory ...
    assert backend.availability() == Availability(BackendState.READY, "tiny-sd not loaded")  # ... this does not
    backend._deps_missing = True
    available = backend.availability()
    assert available.state is BackendState.UNAVAILABLE and not available.accepts_jobs
    assert "torch/diffusers are not installed" in available.reason
    assert backend.health().state is BackendState.UNAVAILABLE  # the same answer, without a probe


def test_a_local_backend_without_torch_refuses_jobs_with_a_4xx(serve: Callable[..., httpx.Client]) -> None:
    client = serve(factories={"fake": FakeBackend}, default_backend="fake")
    sd = client.app.state.services.registry.get("sd")  # type: ignore[attr-defined]
    # Torch missing, as the backend finds it; with the device process (the default) the service-side
    # instance is the one that knows, and no device process is started for it.
    getattr(sd, "inner", sd)._deps_missing = True
    response = client.post("/api/txt2img", json={"prompt": "x", "backend": "sd"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "backend_not_configured" and error["param"] == "backend"
    assert error["message"].startswith("backend 'sd' is unavailable: torch/diffusers are not installed")
    assert client.get("/health").json()["backends"]["sd"]["state"] == "unavailable"
    assert "sd" not in {model["backend"] for model in client.get("/sdapi/v1/sd-models").json()}
    assert client.post("/api/txt2img", json={"prompt": "x"}).status_code == 200  # the others serve on
