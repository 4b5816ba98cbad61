"""The FastAPI app: one engine, one router per protocol."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from .checkpoint import SttModel, load_model
from .engine import Engine
from .settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, model: SttModel | None = None) -> FastAPI:
    """Build the app. The model is loaded (or taken as given) and the engine started in the lifespan."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stt = model or load_model(settings.model, settings.device, settings.dtype)
        engine = Engine(stt, settings.slots, flush_seconds=settings.flush_seconds)
        engine.warmup()
        engine.start()
        app.state.engine = engine
        if stt.random_weights:
            log.warning("%s has RANDOM WEIGHTS: it produces meaningless text", settings.model)
        log.info("serving %s on %s (%s), %d slots", settings.model, stt.device, stt.dtype, settings.slots)
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="kyutai-stt", lifespan=lifespan)
    app.state.settings = settings

    from .protocols import events_ws, seed
    from .ui import mount_ui

    app.include_router(seed.router)
    app.include_router(events_ws.router)
    mount_ui(app)  # the browser page at / and its assets at /static

    @app.get("/status")
    async def status(request: Request) -> dict:
        engine: Engine = request.app.state.engine
        stats = engine.stats()
        return {
            "healthy": stats.worker_alive,
            "model": settings.model,
            "random_weights": engine.model.random_weights,
            "device": str(engine.model.device),
            "dtype": str(engine.model.dtype).removeprefix("torch."),
            "slots_in_use": stats.slots_in_use,
            "slots_total": stats.slots_total,
            "steps": stats.steps,
            "frames": stats.frames,
            "step_failures": stats.failures,
        }

    return app
