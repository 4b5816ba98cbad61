"""What every WebSocket adapter shares before its stream runs: admission (auth, origin, query, a slot), reading
with the idle timeout, and clean closes. The stream itself runs in ``runner.run_stream``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

from fastapi import WebSocket
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from kyutai_stt.audio.constants import FRAME_SIZE
from kyutai_stt.serve.auth import is_authorized
from kyutai_stt.engine.contract import DecodingOptions, EngineStopped, NoFreeSlot
from kyutai_stt.serve.service import get_service
from kyutai_stt.stream.session import Session
from kyutai_stt.serve.protocols.errors import (POLICY_VIOLATION, SERVICE_RESTART, TRY_AGAIN_LATER,
    FinishThenClose, close_for)

log = logging.getLogger(__name__)

Q = TypeVar("Q", bound=BaseModel)


async def close(ws: WebSocket, code: int, reason: str = "") -> None:
    if ws.application_state != WebSocketState.DISCONNECTED and ws.client_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code, reason), timeout=5)


async def deny(ws: WebSocket, response: JSONResponse, message: str) -> None:
    """Refuse the upgrade with ``response``: an HTTP status and the protocol's error body. On a server without the
    denial extension: accept, then close with ``message`` (policy violation), so the client still reads why."""
    try:
        await ws.send_denial_response(response)
    except RuntimeError:
        await ws.accept()
        await close(ws, POLICY_VIOLATION, message)


Refusal = Callable[[int, str], JSONResponse]  # (HTTP status, message) -> a refused upgrade's body, in the protocol's shape


def detail_refusal(status: int, message: str) -> JSONResponse:
    """The default shape of a refused upgrade's body (FastAPI's)."""
    return JSONResponse({"detail": message}, status_code=status)


def _origin_allowed(ws: WebSocket) -> bool:
    """With CORS origins configured, a browser's cross-site WebSocket must come from one of them."""
    allowed = get_service(ws).settings.cors_origins
    origin = ws.headers.get("origin")
    if not allowed or origin is None or "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).netloc == ws.headers.get("host")  # same origin is always fine


async def deny_unauthorized(ws: WebSocket, refusal: Refusal = detail_refusal) -> bool:
    """Refuse the upgrade with HTTP 401 when API keys are configured and none matches. True when refused."""
    if is_authorized(ws):
        return False
    get_service(ws).metrics.errors.labels("unauthorized").inc()
    message = "missing or invalid API key"
    await deny(ws, refusal(401, message), message)
    return True


class AuthQuery(BaseModel):
    """The query parameters every WebSocket endpoint takes: only the API key (browsers cannot set headers).
    Protocols with parameters of their own subclass it; anything else is refused, never ignored."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = None
    auth_id: str | None = None  # moshi-server's name for it


def query_error(model: type[BaseModel], exc: ValidationError, value_error: str | None = None) -> str:
    """A close reason for a query the model refuses: the unknown parameter by name, else ``value_error`` (or
    pydantic's own message for the first wrong value)."""
    for error in exc.errors(include_url=False):
        if error["type"] == "extra_forbidden":
            head = f"unknown query parameter {str(error['loc'][0])[:30]!r} (accepted: "
            accepted = ", ".join(model.model_fields)
            if len(head) + len(accepted) + 1 > 120:  # a close reason is short: as many as fit, the README has all
                accepted = accepted[:120 - len(head) - 5].rsplit(", ", 1)[0] + ", ..."
            return f"{head}{accepted})"
    first = exc.errors(include_url=False)[0]
    if first["type"] == "value_error" and not first["loc"]:  # the model's own check across parameters
        return str(first["ctx"]["error"])
    if value_error:
        return value_error
    return f"query parameter {'.'.join(map(str, first['loc']))}: {first['msg']}"


async def parse_query(ws: WebSocket, model: type[Q], value_error: str | None = None) -> Q | None:
    """The connection's query parameters as ``model`` (pydantic, ``extra="forbid"``). A refused query is answered
    as the tests and clients expect: unauthorized clients get HTTP 401 first; others are accepted, then closed
    with 1008 and the reason. None when refused (the socket is closed)."""
    params = ws.query_params
    repeated = next((key for key in params if len(params.getlist(key)) > 1), None)
    try:
        if repeated is not None:
            raise ValueError(f"query parameter {repeated[:30]!r} given more than once")
        return model.model_validate(dict(params))
    except (ValidationError, ValueError) as exc:
        reason = query_error(model, exc, value_error) if isinstance(exc, ValidationError) else str(exc)
    if await deny_unauthorized(ws):
        return None
    get_service(ws).metrics.errors.labels("policy").inc()
    await ws.accept()
    await close(ws, POLICY_VIOLATION, reason[:120])
    return None


async def open_session(ws: WebSocket, protocol: str,
                       on_full: Callable[[str], Awaitable[None]] | None = None, channels: int = 1,
                       diarize: bool = False, decoding: DecodingOptions | None = None,
                       refusal: Refusal = detail_refusal) -> Session | None:
    """Admit a client: key, origin, a free slot (or a bounded wait for one; ``channels`` slots for a multichannel
    stream; ``diarize``: speakers on its words). None when refused (already closed). ``decoding``: the stream's
    sampling and keyterms (``service.decoding_options``; default the server's). ``refusal``: the protocol's body
    for a refused upgrade (401, 403)."""
    service = get_service(ws)
    if await deny_unauthorized(ws, refusal):
        return None
    if not _origin_allowed(ws):
        service.metrics.errors.labels("forbidden_origin").inc()
        await deny(ws, refusal(403, "origin not allowed"), "origin not allowed")
        return None
    await ws.accept()
    client = ws.client.host if ws.client else "?"
    if service.draining:
        log.info("%s stream from %s refused: server shutting down", protocol, client)
        await close(ws, SERVICE_RESTART, "server shutting down, retry on another instance")
        return None
    if diarize and service.diarizer is None:
        await close(ws, POLICY_VIOLATION, "diarize=true needs a server started with a diarizer (--diarizer)")
        return None
    if diarize and channels > 1:
        await close(ws, POLICY_VIOLATION, "diarize and multichannel cannot be combined: a channel is a speaker")
        return None
    if channels > service.running_engine.batch_size:
        await close(ws, POLICY_VIOLATION, f"{channels} channels need {channels} streams; this server runs "
                                          f"{service.running_engine.batch_size}")
        return None
    session: Session | None = None
    try:
        session = service.new_session(channels, diarize, decoding)
        await service.admit(session)
    except NoFreeSlot:
        if session is not None:
            session.abort()  # it never had a slot: this frees its spool
        reason = f"server full: all {service.running_engine.batch_size} streams are in use, retry later"
        service.metrics.errors.labels("no_free_slot").inc()
        log.warning("%s stream from %s refused: %s", protocol, client, reason)
        if on_full is not None:
            with contextlib.suppress(Exception):
                await on_full(reason)
        await close(ws, TRY_AGAIN_LATER, reason)
        return None
    except ValueError as exc:  # decoding options the engine refuses (keyterms too long in pieces)
        if session is not None:
            session.abort()
        service.metrics.errors.labels("policy").inc()
        await close(ws, POLICY_VIOLATION, str(exc)[:120])
        return None
    except EngineStopped as exc:
        if session is not None:
            session.abort()
        service.metrics.errors.labels("engine_down").inc()
        log.error("%s stream from %s refused: the engine is not running", protocol, client)
        await close(ws, *close_for(exc))
        return None
    service.metrics.sessions.labels(protocol).inc()
    log.info("session %s: %s stream from %s", session.id, protocol, client, extra={"session_id": session.id})
    return session


async def receive_message(ws: WebSocket, session: Session, timeout: float | None = None) -> dict:
    """Next client message, with the protocol's idle timeout applied (None: none); raises WebSocketDisconnect
    when gone.

    The socket is always read, however far ahead of the engine the client is: its audio waits in the session's
    spool, and its keepalive pongs (behind that audio in TCP) keep arriving. Idle for too long: the audio already
        received is finished first (``FinishThenClose``). A client is never idle while the engine still works on its
    audio (a slow engine, a long flush, a turn's end on its way): the idle time counts once that is done."""
    receiving = asyncio.ensure_future(ws.receive())
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        while True:
            # look now and then whether the engine is still on this client's audio (the engine holds back at most
            # a frame and a part of one until more audio comes): the idle time counts from when it is done
            done, _ = await asyncio.wait({receiving}, timeout=None if timeout is None else timeout / 4)
            if done:
                break
            if session.buffered_samples >= 2 * FRAME_SIZE:
                deadline = loop.time() + timeout  # words are still due: not idle
            elif loop.time() >= deadline:  # idle, and the server owes it nothing: finish and close
                raise FinishThenClose(POLICY_VIOLATION, f"no data for {timeout:g} s")
    finally:
        if not receiving.done():
            receiving.cancel()
    message = receiving.result()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message
