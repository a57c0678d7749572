"""GET /metrics: Prometheus exposition (behind the API key unless SD_METRICS_PUBLIC=true)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from imagegen import metrics

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics: requests, jobs, queue, timings, images, model loads, BFL errors, disk, memory."""
    return Response(metrics.render(request.app.state.metrics_registry), media_type=metrics.CONTENT_TYPE)
