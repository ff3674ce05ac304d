"""The ASGI app: ``service.app:app`` (``create_app`` builds one with explicit settings, e.g. in tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from prometheus_client import Counter, Histogram

from service.cache import EmbeddingCache
from service.errors import install_error_handlers
from service.registry import ModelRegistry
from service.routes import collections, ground, search, segment, system
from service.settings import Settings, get_settings
from service.state import AppState
from service.store import CollectionStore

REQUESTS = Counter("vls_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram("vls_request_seconds", "HTTP request latency", ["route"])


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None,
               load_models: bool = True) -> FastAPI:
    """Build the app. Models load in a background thread so /healthz answers at once and /readyz says 503
    until they are loaded and warmed. Tests pass their own ``registry`` with small models injected."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = CollectionStore(settings.data_dir, settings.snapshot_every, settings.ivf_threshold)
        model_registry = registry or ModelRegistry(settings)
        cache = EmbeddingCache(settings.redis_url, settings.text_cache_size)
        app.state.vls = AppState(settings, store, model_registry, cache)
        if load_models:
            threading.Thread(target=model_registry.load_all, name="model-loader", daemon=True).start()
        else:
            model_registry.ready.set()
        try:
            yield
        finally:
            model_registry.close()
            store.close()

    app = FastAPI(title="Vision-language retrieval and grounding service", version="0.1.0", lifespan=lifespan,
                  description="LAPS / IRRA / IVT search, ScanFormer boxes, MagNet masks. Errors are JSON "
                              "`{\"error\": {\"code\", \"message\"}}`.")
    install_error_handlers(app)
    for module in (system, collections, search, ground, segment):
        app.include_router(module.router)

    @app.middleware("http")
    async def count_requests(request: Request, call_next) -> Response:  # noqa: ANN001
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        REQUESTS.labels(name, str(response.status_code)).inc()
        LATENCY.labels(name).observe(time.perf_counter() - start)
        return response

    return app


app = create_app()  # uvicorn service.app:app
