"""What every WebSocket adapter shares: admission (auth, origin, slots, queue), pumping events, clean closes."""

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

from kyutai_stt.serve.auth import is_authorized
from kyutai_stt.engine.contract import EngineStopped, NoFreeSlot
from kyutai_stt.serve.service import get_service
from kyutai_stt.stream.session import Session
from kyutai_stt.serve.protocols.errors import (ERROR_KINDS, GOING_AWAY, INTERNAL_ERROR, INVALID_PAYLOAD, NORMAL,
    POLICY_VIOLATION, SERVICE_RESTART, TOO_BIG, TRY_AGAIN_LATER, UNSUPPORTED_DATA, CloseSocket, InvalidPayload,
    FinishThenClose, PolicyViolation, ServerFault, UnsupportedData, close_for)

log = logging.getLogger(__name__)

Q = TypeVar("Q", bound=BaseModel)


async def close(ws: WebSocket, code: int, reason: str = "") -> None:
    if ws.application_state != WebSocketState.DISCONNECTED and ws.client_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code, reason), timeout=5)


async def _deny(ws: WebSocket, status: int, message: str) -> None:
    """Refuse the upgrade with an HTTP status (servers without the denial extension: close, i.e. HTTP 403)."""
    try:
        await ws.send_denial_response(JSONResponse({"detail": message}, status_code=status))
    except RuntimeError:
        await ws.close(POLICY_VIOLATION, message)


def _origin_allowed(ws: WebSocket) -> bool:
    """With CORS origins configured, a browser's cross-site WebSocket must come from one of them."""
    allowed = get_service(ws).settings.cors_origins
    origin = ws.headers.get("origin")
    if not allowed or origin is None or "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).netloc == ws.headers.get("host")  # same origin is always fine


async def deny_unauthorized(ws: WebSocket) -> bool:
    """Refuse the upgrade with HTTP 401 when API keys are configured and none matches. True when refused."""
    if is_authorized(ws):
        return False
    get_service(ws).metrics.errors.labels("unauthorized").inc()
    await _deny(ws, 401, "missing or invalid API key")
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
            accepted = ", ".join(model.model_fields)
            return f"unknown query parameter {str(error['loc'][0])[:30]!r} (accepted: {accepted})"
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
                       on_full: Callable[[str], Awaitable[None]] | None = None) -> Session | None:
    """Admit a client: key, origin, a free slot (or a bounded wait for one). None when refused (already closed)."""
    service = get_service(ws)
    if await deny_unauthorized(ws):
        return None
    if not _origin_allowed(ws):
        service.metrics.errors.labels("forbidden_origin").inc()
        await _deny(ws, 403, "origin not allowed")
        return None
    await ws.accept()
    client = ws.client.host if ws.client else "?"
    if service.draining:
        log.info("%s stream from %s refused: server shutting down", protocol, client)
        await close(ws, SERVICE_RESTART, "server shutting down, retry on another instance")
        return None
    try:
        session = service.new_session()
        await service.admit(session)
    except NoFreeSlot:
        reason = f"server full: all {service.running_engine.batch_size} streams are in use, retry later"
        service.metrics.errors.labels("no_free_slot").inc()
        log.warning("%s stream from %s refused: %s", protocol, client, reason)
        if on_full is not None:
            with contextlib.suppress(Exception):
                await on_full(reason)
        await close(ws, TRY_AGAIN_LATER, reason)
        return None
    except EngineStopped as exc:
        service.metrics.errors.labels("engine_down").inc()
        log.error("%s stream from %s refused: the engine is not running", protocol, client)
        await close(ws, *close_for(exc))
        return None
    service.metrics.sessions.labels(protocol).inc()
    log.info("session %s: %s stream from %s", session.id, protocol, client, extra={"session_id": session.id})
    return session


async def receive_message(ws: WebSocket, session: Session) -> dict:
    """Next client message, with the idle timeout applied; raises WebSocketDisconnect when gone.

    The socket is always read, however far ahead of the engine the client is: its audio waits in the session's
    spool, and its keepalive pongs (behind that audio in TCP) keep arriving. Idle for too long: the audio already
    received is finished first (``FinishThenClose``)."""
    settings = get_service(ws).settings
    try:
        message = await asyncio.wait_for(ws.receive(), timeout=settings.idle_timeout_s)
    except asyncio.TimeoutError:
        raise FinishThenClose(POLICY_VIOLATION, f"no data for {settings.idle_timeout_s:g} s") from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message


async def serve_session(
    ws: WebSocket,
    session: Session,
    receive: Callable[[Session], Awaitable[None]],
    send: Callable[[Session], Awaitable[None]],
) -> None:
    """Run an adapter's receive and send loops for one session, then clean up and close with a clear code.

    ``receive`` returns once the client has ended its audio (the session then flushes), raises ``CloseSocket``
    on bad input, or ``WebSocketDisconnect`` when the client is gone. ``send`` forwards events and returns after
    the last one (or raises ``CloseSocket``). A client that stops reading is dropped once its backlog passes
    ``max_pending_events``: it never holds up the engine. The slot is always given back, whatever happens.
    """
    service = get_service(ws)
    settings = service.settings
    receiver = asyncio.create_task(receive(session))
    sender = asyncio.create_task(send(session))
    dropped = asyncio.create_task(session.dropped.wait())
    code, reason = NORMAL, ""
    try:
        done, _ = await asyncio.wait({receiver, sender, dropped}, return_when=asyncio.FIRST_COMPLETED)
        if dropped in done:
            raise PolicyViolation("client is not reading its results")
        first = receiver if receiver in done else sender
        exc = first.exception()
        if first is receiver and isinstance(exc, FinishThenClose) and not session.finished:
            session.end()  # finish the audio already received, then close
        if first is receiver and (exc is None or isinstance(exc, FinishThenClose)):
            # The client ended its audio: the words still due come during the flush, which takes as long as the
            # buffered audio needs. Wait as long as the stream makes progress; give up only if it stalls.
            while not sender.done():
                before = session.frames_done
                await asyncio.wait({sender, dropped}, timeout=settings.idle_timeout_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                if dropped.done():
                    raise PolicyViolation("client is not reading its results")
                if not sender.done() and session.frames_done == before:
                    raise ServerFault("timed out while flushing the stream")
            sender.result()
            if exc is not None:
                raise exc
        elif exc is not None:
            raise exc
    except CloseSocket as exc:  # an adapter's own decision: its code and reason
        code, reason = exc.code, exc.reason
    except WebSocketDisconnect as exc:
        code, reason = -1, disconnect_cause(ws, exc.code)  # the client is gone: nothing to close
    except ConnectionError:
        code, reason = -1, "connection lost"
    except Exception as exc:  # bad input raised below the adapter, a send on a dropped socket, or a bug
        if ws.client_state == WebSocketState.DISCONNECTED or ws.application_state == WebSocketState.DISCONNECTED:
            code = -1
        else:
            code, reason = close_for(exc)
            if reason == "internal error":  # not an error we know: a bug, worth its traceback
                log.exception("session %s failed", session.id, extra={"session_id": session.id})
    finally:
        for task in (receiver, sender, dropped):
            task.cancel()
        # wait for the cancelled loops to finish, and retrieve whatever they ended with: handled above
        await asyncio.gather(receiver, sender, dropped, return_exceptions=True)
        completed = session.finished  # its End (or Error) went out: a disconnect after it loses nothing
        if not session.finished:
            session.abort()
        service.forget(session)
        if code in ERROR_KINDS:
            service.metrics.errors.labels(ERROR_KINDS[code]).inc()
        elif code == -1 and reason != "client closed" and not completed:
            service.metrics.errors.labels(reason.replace(" ", "_")).inc()  # keepalive_timeout, connection_lost
        if code != -1:
            await close(ws, code, reason)
        who = f"server closed {code}" if code != -1 else reason or "client gone"
        log.info("session %s: %s after %.1f s of audio%s", session.id, who, session.samples_received / 24000,
                 f": {reason}" if reason and code != -1 else "", extra={"session_id": session.id})


def disconnect_cause(ws: WebSocket, code: int | None) -> str:
    """Why the connection ended on the client's side: "client closed" (it sent a close frame), "keepalive timeout"
    (our ping went unanswered: uvicorn's websockets protocol failed the connection with 1011), or
    "connection lost" (no close frame at all). The protocol object is reached through the ASGI receive callable;
    other servers just give the close code."""
    if code not in (1005, 1006, None):
        return "client closed"
    protocol = getattr(getattr(ws, "_receive", None), "__self__", None)
    sent = getattr(getattr(protocol, "conn", None), "close_sent", None) or getattr(protocol, "close_sent", None)
    if getattr(sent, "code", None) == INTERNAL_ERROR and "keepalive" in (getattr(sent, "reason", "") or ""):
        return "keepalive timeout"
    return "connection lost"
