"""The one stream runner: a protocol's translator over a transport, with everything protocols share.

An adapter only translates (``Translator``): it reads each client message as stream inputs (``Audio``,
``Samples``, ``Marker``, ``Flush``, ``End``, ``Configure``, ``Reply``), renders each session event as its wire
messages, and says what an error looks like in-band. The runner owns the rest, the same for every protocol:
decoding (the translator's ``audio.decoders`` decoder), backpressure (the session's spool: the socket is always
read), mid-stream flushes (``stream.flush``), the turn layer (``stream.turns``, when the translator has one), the
idle timeout (each protocol's own, ``Translator.idle_timeout``), the one error map (``errors.close_for``, with the
protocol's own codes where its reference service differs), waiting out the final flush, and closing.

Two transports share the stream's two loops (``feed_inputs``, ``forward_events``): a WebSocket (``run_stream``,
here) and the Modal Queue (``queue_bridge.transcribe_queue``, whose caller gets a transcript or an exception
instead of a close code).

Adding a protocol: a messages module (``kyutai_stt.messages``), a ``Translator``, and a router line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Mapping, Union

import numpy as np
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.audio.decoders import StreamDecoder
from kyutai_stt.engine.contract import DecodingOptions
from kyutai_stt.messages.events import Error, Event
from kyutai_stt.serve.protocols.common import close, receive_message
from kyutai_stt.serve.protocols.errors import (ERROR_KINDS, INTERNAL_ERROR, NORMAL, CloseSocket, FinishThenClose,
    PolicyViolation, ServerFault, close_for)
from kyutai_stt.serve.service import get_service
from kyutai_stt.stream.flush import Timeline, end_now, flush_now, mark_now
from kyutai_stt.stream.session import Session
from kyutai_stt.stream.turns import TurnTracker

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ what a client message means
@dataclass(frozen=True)
class Audio:
    """Encoded audio for the stream's decoder."""

    data: bytes


@dataclass(frozen=True)
class Samples:
    """Audio already decoded: 24 kHz mono float32 (moshi-server's ``Audio{pcm}``)."""

    pcm: np.ndarray


@dataclass(frozen=True)
class Marker:
    """Echo ``id`` once all audio before it is transcribed."""

    id: int


@dataclass(frozen=True)
class Flush:
    """Transcribe everything so far now, without ending the stream; ``marker`` comes back when it is done (the
    translator's ``flushed`` learns where, in client time, the audio before it ended)."""

    marker: int


@dataclass(frozen=True)
class End:
    """No more audio: the rest is decoded and flushed, the last words come, then the session's ``End``."""


@dataclass(frozen=True)
class Configure:
    """Decode the audio from here on with ``decoder`` (the old one's tail goes first)."""

    decoder: StreamDecoder


@dataclass(frozen=True)
class Reply:
    """Answer the client now (moshi-server's ``Ready`` to ``Init``, a setting's acknowledgement, an in-band error
    after which the stream goes on)."""

    messages: list


@dataclass(frozen=True)
class ResetContext:
    """Reset the model's context now (a client's request); the session answers with a ``Reset`` event."""


@dataclass(frozen=True)
class Decode:
    """Decode with ``options`` from the end of the audio so far (``Session.reconfigure``; a setting mid-stream)."""

    options: DecodingOptions


Input = Union[Audio, Samples, Marker, Flush, End, Configure, Reply, ResetContext, Decode]
Outgoing = Union[str, bytes]  # a text or binary WebSocket message


class Translator:
    """A protocol, as the runner needs it. Subclasses override what their protocol has."""

    protocol = "?"  # label of metrics and logs
    # Close codes of this protocol where its reference service differs from ``errors.CLOSE_CODES``.
    close_codes: Mapping[type[BaseException], int] = {}
    # Close reason after the engine failed the stream (None: the engine's message).
    fault_reason: str | None = None

    def __init__(self, decoder: StreamDecoder | None = None):
        self.decoder = decoder  # None: the protocol sends no encoded audio (``Audio`` is then an error)
        self.timeline = Timeline()  # flush silences, taken out of the times the client sees
        # The turn layer (``stream.turns``), when the protocol speaks of turns: the session's events pass through
        # it before ``render``; a tracker made with ``flush=True`` gets the runner's flush (``bind_flush``).
        self.turns: TurnTracker | None = None

    def idle_timeout(self, settings) -> float | None:
        """Seconds without any client message before the stream is finished and closed (its reference service's
        policy); None: never (the transport's pings still find a dead peer). By default the server's setting."""
        return settings.idle_timeout_s

    def parse(self, message) -> Iterable[Input]:
        """One client message (a WebSocket's ``{"bytes": ...}`` or ``{"text": ...}``, a Queue's item) as stream
        inputs. Raise on bad input."""
        raise NotImplementedError

    def render(self, event: Event) -> Iterable[Outgoing]:
        """One session event as wire messages (none when the protocol has no such message)."""
        raise NotImplementedError

    def finish(self) -> Iterable[Outgoing]:
        """Wire messages after the last event (Deepgram's ``Metadata``)."""
        return ()

    def flushed(self, marker: int, end: float) -> None:
        """A ``Flush`` was fed: its ``marker`` comes back once the audio up to ``end`` (client seconds) is out."""

    def refuse(self, exc: BaseException, code: int, reason: str) -> tuple[Iterable[Outgoing], str]:
        """Bad input closes the stream with ``code``: the in-band messages the client reads first, and the close
        reason (by default ``reason``, the error map's)."""
        return (), reason


# ------------------------------------------------------------------------------ the runner
Receive = Callable[[], Awaitable[object]]  # the next client message (raises when the client is gone or idle)
Send = Callable[[Iterable[object]], Awaitable[None]]  # wire messages to the client, in order


async def feed_inputs(receive: Receive, send: Send, session: Session, translator: Translator,
                      flush: Callable[[int], float]) -> None:
    """Read client messages, as the translator parses them, into the session until the audio ends.

    Bad input (any error the map does not call a server fault) is told in-band as the translator says, then
    raised as ``CloseSocket`` with the map's code (the original error is its ``__cause__``). ``flush(marker)``
    feeds a mid-stream flush and returns where, in client time, the audio before it ended."""

    async def apply(item: Input) -> bool:
        decoder = translator.decoder
        match item:
            case Audio(data=data):
                if decoder is None:
                    raise ValueError(f"{translator.protocol}: encoded audio without a decoder")
                session.push_pcm(decoder.feed(data))
            case Samples(pcm=pcm):
                session.push_pcm(pcm)
            case Marker(id=marker_id):
                mark_now(session, marker_id, translator.timeline)
            case Flush(marker=marker):
                if decoder is not None:
                    session.push_pcm(decoder.flush())
                translator.flushed(marker, flush(marker))
            case Configure(decoder=new):
                if decoder is not None:
                    session.push_pcm(decoder.flush())
                    decoder.close()
                translator.decoder = new
            case Reply(messages=messages):
                await send(messages)
            case ResetContext():
                session.reset_context("client")
            case Decode(options=options):
                # not flushing the decoder: a resampler's held samples count as after the change, and its audio
                # stays as without the change
                session.reconfigure(options)
            case End():
                if decoder is not None:  # a container's or a whole file's rest takes a while: off the event loop
                    session.push_pcm(await asyncio.to_thread(decoder.end))
                end_now(session, translator.timeline)
                return True
        return False

    while True:
        try:
            message = await receive()
        except FinishThenClose:
            # the server ends the stream (idle): the audio received is finished as at the client's own end, what
            # the decoder still holds included (a resampler's last samples, a container's undecoded rest)
            if not session.finished:
                await apply(End())
            raise
        try:
            for item in translator.parse(message):
                if await apply(item):
                    return
        except Exception as exc:
            code, reason = close_for(exc, translator.close_codes)
            if code == INTERNAL_ERROR and not isinstance(exc, CloseSocket):
                raise  # not the client's doing: a bug, logged with its traceback
            messages, reason = translator.refuse(exc, code, reason)
            with contextlib.suppress(Exception):  # the client may be gone: the close says the rest
                await send(messages)
            raise CloseSocket(code, reason) from exc


async def forward_events(send: Send, session: Session, translator: Translator) -> None:
    """Render the session's events to the client until its ``End``; an engine failure is rendered, then raised
    as ``ServerFault``."""
    async for event in session:
        for item in translator.turns.feed(event) if translator.turns is not None else (event,):
            await send(translator.render(item))
        if isinstance(event, Error):
            raise ServerFault(translator.fault_reason or event.message)
    await send(translator.finish())


async def run_stream(ws: WebSocket, session: Session, translator: Translator) -> None:
    """Serve one admitted session over ``ws`` with ``translator`` until it ends; always closes and frees the
    slot (see the module docstring)."""

    async def send(messages: Iterable[Outgoing]) -> None:
        for message in messages:
            await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_text(message))

    def flush(marker: int) -> float:
        return flush_now(session, marker, translator.timeline)

    if translator.turns is not None and translator.turns.flush is not None:
        translator.turns.flush = flush  # the turn layer's own ends flush like a client's Finalize

    async def receive(session: Session) -> None:
        timeout = translator.idle_timeout(get_service(ws).settings)
        await feed_inputs(lambda: receive_message(ws, session, timeout), send, session, translator, flush)

    async def forward(session: Session) -> None:
        await forward_events(send, session, translator)

    try:
        await _serve(ws, session, receive, forward, translator.protocol)
    finally:
        if translator.decoder is not None:
            translator.decoder.close()  # a container decoder's helper thread


async def _serve(ws: WebSocket, session: Session, receive, send, protocol: str) -> None:
    """Run the receive and send loops of one session, then clean up and close with a clear code.

    ``receive`` returns once the client has ended its audio (the session then flushes), raises
    ``FinishThenClose`` once it has ended it itself (idle: the same end, then that close), ``CloseSocket`` on bad
    input, or ``WebSocketDisconnect`` when the client is gone. ``send`` forwards events and returns after
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
        log.info("session %s: %s after %.1f s of audio%s (%s)", session.id, who, session.samples_received / SAMPLE_RATE,
                 f": {reason}" if reason and code != -1 else "", protocol, extra={"session_id": session.id})


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

