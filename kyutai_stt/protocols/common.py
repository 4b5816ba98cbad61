"""What every WebSocket adapter shares: admission (auth, origin, slots, queue), pumping events, clean closes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from fastapi import WebSocket
from starlette.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..auth import is_authorized
from ..engine import EngineStopped, NoFreeSlot
from ..session import Session

log = logging.getLogger(__name__)

# WebSocket close codes (RFC 6455 and IANA registry).
NORMAL = 1000
GOING_AWAY = 1001
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013

ERROR_KINDS = {UNSUPPORTED_DATA: "unsupported_data", INVALID_PAYLOAD: "invalid_data", POLICY_VIOLATION: "policy",
               TOO_BIG: "too_big", INTERNAL_ERROR: "internal", TRY_AGAIN_LATER: "no_free_slot"}


class CloseSocket(Exception):
    """Raised by an adapter's loops to close the socket with a code and reason."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason[:120]  # a close reason must fit in 123 bytes


class FinishThenClose(CloseSocket):
    """A close the server chooses although the client did nothing wrong (idle timeout): the audio already
    received is finished first, its words and end are sent, then the socket closes with the code."""


def _metrics(ws: WebSocket):
    return ws.app.state.metrics


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
    allowed = ws.app.state.settings.cors_origins
    origin = ws.headers.get("origin")
    if not allowed or origin is None or "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).netloc == ws.headers.get("host")  # same origin is always fine


async def deny_unauthorized(ws: WebSocket) -> bool:
    """Refuse the upgrade with HTTP 401 when API keys are configured and none matches. True when refused."""
    if is_authorized(ws):
        return False
    _metrics(ws).errors.labels("unauthorized").inc()
    await _deny(ws, 401, "missing or invalid API key")
    return True


async def open_session(ws: WebSocket, protocol: str,
                       on_full: Callable[[str], Awaitable[None]] | None = None) -> Session | None:
    """Admit a client: key, origin, a free slot (or a bounded wait for one). None when refused (already closed)."""
    app = ws.app
    settings = app.state.settings
    if await deny_unauthorized(ws):
        return None
    if not _origin_allowed(ws):
        _metrics(ws).errors.labels("forbidden_origin").inc()
        await _deny(ws, 403, "origin not allowed")
        return None
    await ws.accept()
    if app.state.draining:
        await close(ws, SERVICE_RESTART, "server shutting down, retry on another instance")
        return None
    session = Session(app.state.engine, end_of_turn_threshold=settings.end_of_turn_threshold,
                      max_seconds=settings.max_session_s, record_dir=settings.record_dir,
                      max_pending_events=settings.max_pending_events,
                      max_buffered_seconds=settings.max_buffered_audio_s,
                      spool_memory_seconds=settings.spool_memory_s)
    try:
        await _take_slot(ws, session)
    except NoFreeSlot:
        reason = f"server full: all {app.state.engine.batch_size} streams are in use, retry later"
        _metrics(ws).errors.labels("no_free_slot").inc()
        if on_full is not None:
            with contextlib.suppress(Exception):
                await on_full(reason)
        await close(ws, TRY_AGAIN_LATER, reason)
        return None
    except EngineStopped:
        _metrics(ws).errors.labels("engine_down").inc()
        await close(ws, INTERNAL_ERROR, "the transcription engine is not running")
        return None
    app.state.sessions.add(session)
    _metrics(ws).sessions.labels(protocol).inc()
    log.info("session %s: %s stream from %s", session.id, protocol, ws.client.host if ws.client else "?", extra={"session_id": session.id})
    return session


async def _take_slot(ws: WebSocket, session: Session) -> None:
    """Start the session now, or wait in the bounded queue (``queue_max``, ``queue_timeout_s``) for a slot."""
    app, settings = ws.app, ws.app.state.settings
    try:
        session.start()
        return
    except NoFreeSlot:
        if app.state.queued >= settings.queue_max:
            raise
    app.state.queued += 1
    _metrics(ws).queued_clients.inc()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.queue_timeout_s
        while True:
            await asyncio.sleep(0.05)
            try:
                session.start()
                return
            except NoFreeSlot:
                if loop.time() >= deadline or app.state.draining:
                    raise
    finally:
        app.state.queued -= 1
        _metrics(ws).queued_clients.dec()


async def receive_message(ws: WebSocket, session: Session) -> dict:
    """Next client message, with the idle timeout applied; raises WebSocketDisconnect when gone.

    The socket is always read, however far ahead of the engine the client is: its audio waits in the session's
    spool, and its keepalive pongs (behind that audio in TCP) keep arriving."""
    settings = ws.app.state.settings
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
    settings = ws.app.state.settings
    receiver = asyncio.create_task(receive(session))
    sender = asyncio.create_task(send(session))
    dropped = asyncio.create_task(session.dropped.wait())
    code, reason = NORMAL, ""
    try:
        done, _ = await asyncio.wait({receiver, sender, dropped}, return_when=asyncio.FIRST_COMPLETED)
        if dropped in done:
            raise CloseSocket(POLICY_VIOLATION, "client is not reading its results")
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
                    raise CloseSocket(POLICY_VIOLATION, "client is not reading its results")
                if not sender.done() and session.frames_done == before:
                    raise asyncio.TimeoutError
            sender.result()
            if exc is not None:
                raise exc
        elif exc is not None:
            raise exc
    except CloseSocket as exc:
        code, reason = exc.code, exc.reason
    except WebSocketDisconnect as exc:
        code, reason = -1, disconnect_cause(ws, exc.code)  # the client is gone: nothing to close
    except ConnectionError:
        code, reason = -1, "connection lost"
    except asyncio.TimeoutError:
        code, reason = INTERNAL_ERROR, "timed out while flushing the stream"
    except Exception:  # a send on a socket the client dropped, or a bug: never leak the slot
        if ws.client_state == WebSocketState.DISCONNECTED or ws.application_state == WebSocketState.DISCONNECTED:
            code = -1
        else:
            log.exception("session %s failed", session.id, extra={"session_id": session.id})
            code, reason = INTERNAL_ERROR, "internal error"
    finally:
        for task in (receiver, sender, dropped):
            task.cancel()
        # wait for the cancelled loops to finish, and retrieve whatever they ended with: handled above
        await asyncio.gather(receiver, sender, dropped, return_exceptions=True)
        completed = session.finished  # its End (or Error) went out: a disconnect after it loses nothing
        if not session.finished:
            session.abort()
        ws.app.state.sessions.discard(session)
        if code in ERROR_KINDS:
            _metrics(ws).errors.labels(ERROR_KINDS[code]).inc()
        elif code == -1 and reason != "client closed" and not completed:
            _metrics(ws).errors.labels(reason.replace(" ", "_")).inc()  # keepalive_timeout, connection_lost
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
