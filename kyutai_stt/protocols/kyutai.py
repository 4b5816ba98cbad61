"""Kyutai moshi-server compatibility at ``/api/asr-streaming`` (msgpack over WebSocket, and HTTP POST of a file).

Spoken by Kyutai's own client scripts and by unmute. Every message is one binary frame holding a msgpack map with a
``type``. In: ``Audio{pcm}`` (float32 at 24 kHz, any length), ``OggOpus{data}``, ``Marker{id}``, ``Init``; text
frames are ignored. Out: ``Ready`` first, then ``Step{step_idx, prs, buffered_pcm}`` every 80 ms when the model has
VAD heads, ``Word{text, start_time}``, ``EndWord{stop_time}``, ``Marker{id}`` once all audio sent before it has been
transcribed (model delay included), ``Error{message}``. There is no end-of-stream message: clients send a marker,
keep sending silence, and close when it comes back.
"""

from __future__ import annotations

import msgpack
import numpy as np
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..audio import AudioFormatError, AudioTooLong, OggOpusDecoder, load_audio_bytes
from ..auth import is_authorized
from ..engine import NoFreeSlot
from ..events import Error, Marker, Ready, Step, Word, WordEnd
from ..session import Session, SessionLimitError
from ..transcribe import session_events
from .common import INVALID_PAYLOAD, POLICY_VIOLATION, CloseSocket, open_session, receive_message, serve_session

router = APIRouter()
PATH = "/api/asr-streaming"


def wire(event) -> dict | None:
    """Our event as moshi-server's message, or None when moshi-server has no such message."""
    if isinstance(event, Word):
        return {"type": "Word", "text": event.text, "start_time": event.start_time}
    if isinstance(event, WordEnd):
        return {"type": "EndWord", "stop_time": event.stop_time}
    if isinstance(event, Step):
        if event.pause_probabilities is None:
            return None  # models without VAD heads send no Step, as moshi-server
        return {"type": "Step", "step_idx": event.step_idx, "prs": list(event.pause_probabilities),
                "buffered_pcm": event.buffered_samples}
    if isinstance(event, Marker):
        return {"type": "Marker", "id": event.id}
    if isinstance(event, Ready):
        return {"type": "Ready"}
    if isinstance(event, Error):
        return {"type": "Error", "message": event.message}
    return None


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _pcm(value) -> np.ndarray:
    """Audio.pcm as float32. NaN or infinite samples are refused (1007); finite samples beyond [-1, 1] are clipped
    to it, as a sound card would."""
    if isinstance(value, (bytes, bytearray)):  # raw little-endian float32 is accepted too
        pcm = np.frombuffer(value[: len(value) // 4 * 4], "<f4").astype(np.float32)
    elif isinstance(value, list):
        pcm = np.asarray(value, dtype=np.float32)
    else:
        raise AudioFormatError("Audio.pcm must be a list of floats")
    if pcm.ndim != 1:
        raise AudioFormatError("Audio.pcm must be a flat list of floats")
    if not np.all(np.isfinite(pcm)):
        raise AudioFormatError("Audio.pcm contains NaN or infinite values")
    return np.clip(pcm, -1.0, 1.0)


@router.websocket(PATH)
async def kyutai_socket(ws: WebSocket) -> None:
    async def refuse(_reason: str) -> None:
        await ws.send_bytes(pack({"type": "Error", "message": "no free channels"}))

    session = await open_session(ws, "kyutai", on_full=refuse)
    if session is None:
        return
    opus: OggOpusDecoder | None = None

    async def receive(session: Session) -> None:
        nonlocal opus
        while True:
            message = await receive_message(ws, session)
            data = message.get("bytes")
            if data is None:
                continue  # moshi-server ignores text frames
            try:
                try:
                    msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
                except (ValueError, TypeError, msgpack.StackError) as exc:  # ExtraData, FormatError: ValueErrors
                    raise AudioFormatError(f"malformed msgpack ({exc or type(exc).__name__})") from None
                if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                    raise AudioFormatError("each message must be a msgpack map with a 'type'")
                kind = msg["type"]
                if kind == "Audio":
                    session.push_pcm(_pcm(msg.get("pcm")))
                elif kind == "OggOpus":
                    if not isinstance(msg.get("data"), (bytes, bytearray)):
                        raise AudioFormatError("OggOpus.data must be bytes")
                    opus = opus or OggOpusDecoder()
                    session.push_pcm(opus.feed(bytes(msg["data"])))
                elif kind == "Marker":
                    if not isinstance(msg.get("id"), int) or isinstance(msg["id"], bool):
                        raise AudioFormatError("Marker.id must be an integer")
                    session.push_marker(msg["id"])
                elif kind == "Init":
                    await ws.send_bytes(pack({"type": "Ready"}))
                else:
                    raise AudioFormatError(f"unknown message type {kind[:40]!r}")
            except SessionLimitError as exc:  # before ValueError, its base class
                await ws.send_bytes(pack({"type": "Error", "message": str(exc)}))
                raise CloseSocket(POLICY_VIOLATION, str(exc)) from None
            except (AudioFormatError, ValueError, TypeError, OverflowError) as exc:  # also numpy's, on a bad pcm
                message = f"invalid message: {str(exc)[:200]}"
                await ws.send_bytes(pack({"type": "Error", "message": message}))
                raise CloseSocket(INVALID_PAYLOAD, message) from None

    async def send(session: Session) -> None:
        async for event in session:
            message = wire(event)
            if message is not None:
                await ws.send_bytes(pack(message))
            if isinstance(event, Error):
                raise CloseSocket(1011, event.message)

    await serve_session(ws, session, receive, send)


@router.post(PATH)
async def kyutai_post(request: Request):
    """A whole audio file in the body; the answer is the JSON list of Word/EndWord messages."""
    if not is_authorized(request):
        return JSONResponse({"detail": "missing or invalid API key"}, status_code=401)
    settings = request.app.state.settings
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
        return JSONResponse({"detail": str(exc)}, status_code=400)
    messages = []
    try:
        async for event in session_events(request.app.state.engine, pcm, wait_seconds=settings.http_slot_wait_s,
                                          end_of_turn_threshold=settings.end_of_turn_threshold):
            if isinstance(event, (Word, WordEnd)):
                messages.append(wire(event))
            elif isinstance(event, Error):
                return JSONResponse({"detail": event.message}, status_code=500)
    except NoFreeSlot:
        return JSONResponse({"detail": "no free channels"}, status_code=503, headers={"Retry-After": "5"})
    return messages
