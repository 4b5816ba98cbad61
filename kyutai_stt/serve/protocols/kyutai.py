"""Kyutai moshi-server compatibility at ``/api/asr-streaming`` (msgpack over WebSocket, and HTTP POST of a file).

Spoken by Kyutai's own client scripts and by unmute. Every message is one binary frame holding a msgpack map with a
``type``. In: ``Audio{pcm}`` (float32 at 24 kHz, any length), ``OggOpus{data}``, ``Marker{id}``, ``Init``; text
frames are ignored. Out: ``Ready`` first, then ``Step{step_idx, prs, buffered_pcm}`` every 80 ms when the model has
VAD heads, ``Word{text, start_time}``, ``EndWord{stop_time}``, ``Marker{id}`` once all audio sent before it has been
transcribed (model delay included), ``Error{message}``. There is no end-of-stream message: clients send a marker,
keep sending silence, and close when it comes back.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from kyutai_stt.audio.decode import AudioFormatError, AudioTooLong, OggOpusDecoder, load_audio_bytes
from kyutai_stt.serve.auth import is_authorized
from kyutai_stt.engine.contract import NoFreeSlot
from kyutai_stt.messages.events import Error, Marker, Ready, Step, Word, WordEnd
from kyutai_stt.messages import kyutai as wire
from kyutai_stt.serve.service import get_service
from kyutai_stt.stream.session import Session
from kyutai_stt.stream.transcribe import session_events
from kyutai_stt.serve.protocols.common import AuthQuery, open_session, parse_query, receive_message, serve_session
from kyutai_stt.serve.protocols.errors import (INTERNAL_ERROR, INVALID_PAYLOAD, CloseSocket, ServerFault, close_for,
    upload_error_detail)

log = logging.getLogger(__name__)
router = APIRouter()
PATH = "/api/asr-streaming"


def to_wire(event) -> wire.Ready | wire.Word | wire.EndWord | wire.Step | wire.Marker | wire.Error | None:
    """Our event as moshi-server's message, or None when moshi-server has no such message."""
    match event:
        case Word():
            return wire.Word(text=event.text, start_time=event.start_time)
        case WordEnd():
            return wire.EndWord(stop_time=event.stop_time)
        case Step(pause_probabilities=None):
            return None  # models without VAD heads send no Step, as moshi-server
        case Step():
            return wire.Step(step_idx=event.step_idx, prs=list(event.pause_probabilities),
                             buffered_pcm=event.buffered_samples)
        case Marker():
            return wire.Marker(id=event.id)
        case Ready():
            return wire.Ready()
        case Error():
            return wire.Error(message=event.message)
    return None


def wire_dict(event) -> dict | None:
    """Our event as moshi-server's message, as a plain map (the JSON answer of the POST)."""
    message = to_wire(event)
    return message.model_dump() if message is not None else None


@router.websocket(PATH)
async def kyutai_socket(ws: WebSocket) -> None:
    if await parse_query(ws, AuthQuery) is None:
        return

    async def refuse(_reason: str) -> None:
        await ws.send_bytes(wire.pack(wire.Error(message="no free channels")))

    session = await open_session(ws, "kyutai", on_full=refuse)
    if session is None:
        return
    opus: OggOpusDecoder | None = None

    async def receive(session: Session) -> None:
        nonlocal opus
        while True:
            data = (await receive_message(ws, session)).get("bytes")
            if data is None:
                continue  # moshi-server ignores text frames
            try:
                match wire.parse_client_message(data):
                    case wire.Audio(pcm=pcm):
                        session.push_pcm(pcm)
                    case wire.OggOpus(data=ogg):
                        opus = opus or OggOpusDecoder()
                        session.push_pcm(opus.feed(ogg))
                    case wire.Marker(id=marker_id):
                        session.push_marker(marker_id)
                    case wire.Init():
                        await ws.send_bytes(wire.pack(wire.Ready()))
            except Exception as exc:  # moshi-server clients read an Error message before the close
                code, reason = close_for(exc)
                if code == INTERNAL_ERROR:
                    raise
                message = f"invalid message: {str(exc)[:200]}" if code == INVALID_PAYLOAD else reason
                await ws.send_bytes(wire.pack(wire.Error(message=message)))
                raise CloseSocket(code, message) from None

    async def send(session: Session) -> None:
        async for event in session:
            message = to_wire(event)
            if message is not None:
                await ws.send_bytes(wire.pack(message))
            if isinstance(event, Error):
                raise ServerFault(event.message)

    await serve_session(ws, session, receive, send)


@router.post(PATH)
async def kyutai_post(request: Request):
    """A whole audio file in the body; the answer is the JSON list of Word/EndWord messages."""
    if not is_authorized(request):
        return JSONResponse({"detail": "missing or invalid API key"}, status_code=401)
    service = get_service(request)
    settings = service.settings
    too_big = JSONResponse({"detail": f"file larger than {settings.max_upload_bytes} bytes"}, status_code=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes:
        return too_big
    body = bytearray()
    async for chunk in request.stream():  # never hold more than the limit in memory
        body += chunk
        if len(body) > settings.max_upload_bytes:
            return too_big
    try:
        # decoding takes a while for a long file: off the event loop, so that live streams are not held up
        pcm = await run_in_threadpool(load_audio_bytes, bytes(body), max_seconds=settings.max_session_s)
    except AudioTooLong as exc:
        return JSONResponse({"detail": str(exc)}, status_code=413)
    except AudioFormatError as exc:
        return JSONResponse({"detail": upload_error_detail(exc)}, status_code=400)
    messages = []
    try:
        async for event in session_events(service.running_engine, pcm, wait_seconds=settings.http_slot_wait_s,
                                          end_of_turn_threshold=settings.end_of_turn_threshold):
            if isinstance(event, (Word, WordEnd)):
                messages.append(wire_dict(event))
            elif isinstance(event, Error):
                return JSONResponse({"detail": event.message}, status_code=500)
    except NoFreeSlot:
        log.warning("POST %s refused: server full (no slot within %g s)", PATH, settings.http_slot_wait_s)
        return JSONResponse({"detail": "no free channels"}, status_code=503, headers={"Retry-After": "5"})
    return messages
