"""The FastAPI app: one engine, one router per protocol, status, metrics, graceful shutdown."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from kyutai_stt.engine.contract import Engine, NoFreeSlot
from kyutai_stt.engine.startup import start_diarizer, start_engine
from kyutai_stt.serve.keepalive import SendingPeerIsAlive
from kyutai_stt.serve.logs import redact_uvicorn_logs
from kyutai_stt.serve.metrics import Metrics
from kyutai_stt.serve.service import Service, get_service
from kyutai_stt.serve.uploads import HttpProblem, problem_response, server_busy
from kyutai_stt.settings import Settings

log = logging.getLogger(__name__)
access_log = logging.getLogger("kyutai_stt.access")


def create_app(settings: Settings | None = None, model=None, engine: Engine | None = None,
               diarizer=None) -> FastAPI:
    """Build the app. The engine is started in the lifespan (``start_engine``, over ``model`` when given).

    ``engine``: serve an engine that is already warmed up and running (the Modal app shares one between its
    web app and its Queue method); its owner stops it, not the app. ``diarizer``: a started ``Diarizer`` to
    serve (its owner stops it); else the one ``settings.diarizer`` names is started with the engine.
    """
    settings = settings or Settings()
    metrics = Metrics()
    service = Service(settings, metrics, diarizer=diarizer)
    if engine is not None:
        service.attach(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is not None:
            yield
            return
        own = start_engine(settings, model)
        service.attach(own)
        own_diarizer = start_diarizer(settings) if diarizer is None else None
        if own_diarizer is not None:
            service.diarizer = own_diarizer
        try:
            yield
        finally:
            own.stop()
            if own_diarizer is not None:
                own_diarizer.stop()

    app = FastAPI(title="kyutai-stt", lifespan=lifespan)
    app.state.service = service  # the one object handlers reach, through service.get_service
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    @app.middleware("http")
    async def log_requests(request: Request, call_next):
        # Our own access log: the path without its query string, which may carry an API key.
        start = time.perf_counter()
        response = await call_next(request)  # (uploads are capped by their routes: uploads.ProblemRoute)
        access_log.info("%s %s %d %.0f ms", request.method, request.url.path, response.status_code,
                        (time.perf_counter() - start) * 1000)
        return response

    from kyutai_stt.serve.protocols import events_ws, kyutai, openai, seed
    from kyutai_stt.serve.ui import mount_ui

    for protocol in (seed, events_ws, kyutai, openai):
        app.include_router(protocol.router)
    from kyutai_stt.serve.protocols import deepgram, flux, openai_realtime
    app.include_router(deepgram.router)
    app.include_router(flux.router)
    app.include_router(openai_realtime.router)
    mount_ui(app)  # the browser page at / and its assets at /static

    # Errors of the HTTP endpoints, answered once for all: the route's protocol writes the body (uploads.py).
    @app.exception_handler(HTTPException)
    async def http_problem(request: Request, exc: HTTPException) -> Response:
        problem = exc if isinstance(exc, HttpProblem) else HttpProblem(exc.status_code, str(exc.detail),
                                                                       headers=exc.headers)
        return problem_response(request, problem) or await http_exception_handler(request, exc)

    @app.exception_handler(NoFreeSlot)
    async def no_free_slot(request: Request, exc: NoFreeSlot) -> Response:
        log.warning("%s %s refused: server full (no slot within %g s)", request.method, request.url.path,
                    settings.http_slot_wait_s)
        return await http_problem(request, server_busy())

    @app.get("/status")
    async def status(request: Request):
        service = get_service(request)
        engine = service.running_engine
        stats = engine.stats()
        healthy = stats.worker_alive and not service.draining
        body = {
            "healthy": healthy,
            "draining": service.draining,
            "model": settings.model,
            "family": engine.info.family,
            "random_weights": engine.info.random_weights,
            "device": engine.info.device,
            "dtype": engine.info.dtype,
            "slots_in_use": stats.slots_in_use,
            "slots_total": stats.slots_total,
            "steps": stats.steps,
            "frames": stats.frames,
            "step_failures": stats.failures,
            "real_time_factor": round(service.pace.real_time_factor(), 3),
            "max_backlog_s": round(service.pace.max_backlog_seconds(), 2),
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(get_service(request).running_engine), media_type="text/plain; version=0.0.4")

    return app


class GracefulServer(uvicorn.Server):
    """uvicorn, but on SIGTERM/SIGINT active streams flush and close cleanly before connections are cut."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, on_ready: Callable[[], None] | None = None):
        super().__init__(config)
        self._app = app
        self._on_ready = on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)  # runs the lifespan (model warm-up) first, then listens
        if self.started and self._on_ready is not None:
            self._on_ready()

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:  # stop accepting first
            server.close()
        service: Service = self._app.state.service
        await service.drain(service.settings.shutdown_flush_s)
        await super().shutdown(sockets)


def uvicorn_config(app: FastAPI | None, settings: Settings) -> uvicorn.Config:
    """uvicorn as every server process runs it: keepalive pings that never cut off a client still sending
    (``keepalive``), message cap, our own access log, no query string (an API key) in uvicorn's lines."""
    redact_uvicorn_logs()
    return uvicorn.Config(app, host=settings.host, port=settings.port, ws=SendingPeerIsAlive,
                          ws_max_size=settings.max_message_bytes, ws_ping_interval=settings.ping_interval_s,
                          ws_ping_timeout=2 * settings.ping_interval_s, access_log=False, log_config=None)


def serve(settings: Settings, model=None, on_ready: Callable[[], None] | None = None) -> None:
    """Run the server until SIGTERM/SIGINT. ``on_ready`` is called once it answers (engine warm, socket open)."""
    app = create_app(settings, model)
    GracefulServer(uvicorn_config(app, settings), app, on_ready).run()
