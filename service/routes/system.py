"""Liveness, readiness, loaded models, Prometheus metrics, and the try-it page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.state import AppState, get_state

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: AppState = Depends(get_state)) -> JSONResponse:
    """503 until every configured model is loaded and warmed (a method that failed to load is reported)."""
    registry = state.registry
    ready = registry.ready.is_set()
    body = {"status": "ready" if ready else "loading", "models": sorted(registry.entries),
            "failed": registry.errors}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/models")
def models(state: AppState = Depends(get_state)) -> dict[str, Any]:
    return {"models": [e.describe() for e in state.registry.entries.values()],
            "unavailable": state.registry.errors, "cache_backend": state.cache.backend}


@router.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index_page() -> HTMLResponse:
    return HTMLResponse((Path(__file__).parent.parent / "static" / "index.html").read_text())
