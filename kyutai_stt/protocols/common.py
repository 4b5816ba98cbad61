"""What every WebSocket adapter shares: opening a session, pumping events, closing with a clear code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from starlette.responses import JSONResponse

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
TRY_AGAIN_LATER = 1013


class CloseSocket(Exception):
    """Raised by an adapter's receive loop to close the socket with a code and reason."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason[:120]  # a close reason must fit in 123 bytes


def new_session(ws: WebSocket) -> Session:
    settings = ws.app.state.settings
    return Session(ws.app.state.engine, end_of_turn_threshold=settings.end_of_turn_threshold,
                   max_seconds=settings.max_session_s, record_dir=settings.record_dir)


async def close(ws: WebSocket, code: int, reason: str = "") -> None:
    if ws.application_state != WebSocketState.DISCONNECTED and ws.client_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            await ws.close(code, reason)


async def serve_session(
    ws: WebSocket,
    session: Session,
    receive: Callable[[Session], Awaitable[None]],
    send: Callable[[Session], Awaitable[None]],
) -> None:
    """Run an adapter's receive and send loops for one session, then clean up and close with a clear code.

    ``receive`` returns once the client has ended its audio (the session then flushes), raises ``CloseSocket``
    on bad input, or ``WebSocketDisconnect`` when the client is gone. ``send`` forwards events and returns after
    the last one (or raises ``CloseSocket``). The slot is always given back, whatever happens.
    """
    settings = ws.app.state.settings
    receiver = asyncio.create_task(receive(session))
    sender = asyncio.create_task(send(session))
    code, reason = NORMAL, ""
    try:
        done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        first = receiver if receiver in done else sender
        exc = first.exception()
        if exc is None and first is receiver:
            # The client ended its audio: the words still due come during the flush, which takes as long as the
            # buffered audio needs. Wait as long as the stream makes progress; give up only if it stalls.
            while not sender.done():
                before = session.frames_done
                await asyncio.wait({sender}, timeout=settings.idle_timeout_s)
                if not sender.done() and session.frames_done == before:
                    raise asyncio.TimeoutError
            sender.result()
        elif exc is not None:
            raise exc
    except CloseSocket as exc:
        code, reason = exc.code, exc.reason
    except (WebSocketDisconnect, ConnectionError):
        code = -1  # the client is gone: nothing to close
    except asyncio.TimeoutError:
        code, reason = INTERNAL_ERROR, "timed out while flushing the stream"
    except Exception as exc:  # a send on a socket the client dropped, or a bug: never leak the slot
        if ws.client_state == WebSocketState.DISCONNECTED or ws.application_state == WebSocketState.DISCONNECTED:
            code = -1
        else:
            log.exception("session %s failed", session.id)
            code, reason = INTERNAL_ERROR, "internal error"
    finally:
        for task in (receiver, sender):
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: its outcome was handled above
        if not session.finished:
            session.abort()
        if code != -1:
            await close(ws, code, reason)
        log.info("session %s closed (%s %s) after %.1f s of audio", session.id, code, reason,
                 session.samples_received / 24000)


async def deny_unauthorized(ws: WebSocket) -> bool:
    """Refuse the upgrade with HTTP 401 when API keys are configured and none matches. True when denied."""
    if is_authorized(ws):
        return False
    response = JSONResponse({"detail": "missing or invalid API key"}, status_code=401)
    try:
        await ws.send_denial_response(response)
    except RuntimeError:  # server without the denial-response extension: close before accepting (HTTP 403)
        await ws.close(POLICY_VIOLATION, "missing or invalid API key")
    return True


async def open_session(ws: WebSocket, on_full: Callable[[str], Awaitable[None]] | None = None) -> Session | None:
    """Check the key, accept the socket and take a slot; when none is free, tell the client and close with 1013."""
    if await deny_unauthorized(ws):
        return None
    await ws.accept()
    session = new_session(ws)
    try:
        session.start()
    except NoFreeSlot:
        reason = f"server full: all {ws.app.state.engine.batch_size} streams are in use, retry later"
        if on_full is not None:
            with contextlib.suppress(Exception):
                await on_full(reason)
        await close(ws, TRY_AGAIN_LATER, reason)
        return None
    except EngineStopped:
        await close(ws, INTERNAL_ERROR, "the transcription engine is not running")
        return None
    return session


async def receive_message(ws: WebSocket, session: Session) -> dict:
    """Next client message, with the idle timeout applied; raises WebSocketDisconnect when gone."""
    settings = ws.app.state.settings
    try:
        message = await asyncio.wait_for(ws.receive(), timeout=settings.idle_timeout_s)
    except asyncio.TimeoutError:
        raise CloseSocket(POLICY_VIOLATION, f"no data for {settings.idle_timeout_s:g} s") from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message
