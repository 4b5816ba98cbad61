"""OpenAI Realtime transcription at ``WS /v1/realtime?intent=transcription``, as the ``openai`` SDK connects
(``client.realtime.connect(extra_query={"intent": "transcription"})``; ``client.beta.realtime`` too).

Client events (the GA names, and the beta ``transcription_session.update``):
- ``session.update`` / ``transcription_session.update``: input format ``audio/pcm`` at 24 kHz (beta ``pcm16``),
  ``audio/pcmu`` / ``audio/pcma`` (beta ``g711_ulaw`` / ``g711_alaw``, 8 kHz); ``transcription.language`` checked
  against the model's languages; ``transcription.model`` is a label; ``turn_detection`` ``server_vad`` (our VAD
  head; its threshold and durations are not used) or null (commit by hand). A ``prompt``, ``semantic_vad``,
  ``noise_reduction`` or ``include`` (log probabilities) is refused with an ``error`` event.
- ``input_audio_buffer.append`` (base64 audio), ``.commit`` (flush now: ``flush.flush_now``; every word of the
  audio so far ends the current item), ``.clear`` (the audio not yet transcribed is flushed and its words dropped).

Server events: ``session.created`` / ``session.updated`` (``transcription_session.*`` for the beta names),
``input_audio_buffer.speech_started`` (the first text of a turn), ``.speech_stopped`` and ``.committed`` (the VAD
head's end of turn, or a commit), ``conversation.item.input_audio_transcription.delta`` (each text piece as the
model produces it) and ``.completed`` (the item's words), ``input_audio_buffer.cleared``, and ``error``
(``{"type": "error", "error": {"type", "code", "message", "param", "event_id"}}``): a bad event (unknown type,
a setting we cannot honour, audio that is not base64) is answered with an error and the session goes on, as
OpenAI's does; a stream past ``max_session_s`` is closed (1008).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket
from pydantic import ValidationError

from kyutai_stt.audio.decode import StreamResampler
from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.messages.events import EndOfTurn, Error, Marker, Text, Word
from kyutai_stt.messages.languages import base_language
from kyutai_stt.messages.openai_realtime import Append, Clear, ClientEvent, Commit, SessionUpdate
from kyutai_stt.serve.service import get_service
from kyutai_stt.stream.session import Session, SessionLimitError
from kyutai_stt.serve.protocols.common import (INTERNAL_ERROR, POLICY_VIOLATION, CloseSocket, close, open_session,
    receive_message, serve_session)
from kyutai_stt.stream.flush import Timeline, flush_now

router = APIRouter()

FORMATS = {"audio/pcm": "pcm16", "pcm16": "pcm16", "audio/pcmu": "g711_ulaw", "g711_ulaw": "g711_ulaw",
           "audio/pcma": "g711_alaw", "g711_alaw": "g711_alaw"}


class RealtimeError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


class _Config:
    """The transcription session's settings, as the client set them (GA or beta shape)."""

    def __init__(self, languages: tuple[str, ...]):
        self.languages = languages
        self.format = "pcm16"
        self.language: str | None = None
        self.model = "kyutai"
        self.server_vad = True

    def update(self, session: dict[str, Any]) -> None:
        if session.get("type") not in (None, "transcription"):
            raise RealtimeError("only transcription sessions are served here (session.type=transcription)",
                                "session.type")
        audio = session.get("audio") or {}
        source = audio.get("input") or {}
        fmt = source.get("format", session.get("input_audio_format"))
        transcription = source.get("transcription", session.get("input_audio_transcription")) or {}
        turn = source.get("turn_detection", session.get("turn_detection", "unset"))
        noise = source.get("noise_reduction", session.get("input_audio_noise_reduction"))
        if session.get("include"):
            raise RealtimeError("include (log probabilities) is not supported", "session.include")
        if noise:
            raise RealtimeError("noise reduction is not supported", "session.audio.input.noise_reduction")
        if fmt is not None:
            name = fmt.get("type") if isinstance(fmt, dict) else fmt
            if name not in FORMATS:
                raise RealtimeError(f"audio format {name!r} is not supported: audio/pcm (24 kHz), audio/pcmu, "
                                    "audio/pcma", "session.audio.input.format")
            if isinstance(fmt, dict) and fmt.get("rate") not in (None, 24000):
                raise RealtimeError("audio/pcm is 24000 Hz", "session.audio.input.format.rate")
            self.format = FORMATS[name]
        if transcription.get("prompt"):
            raise RealtimeError("prompt is not supported: the model takes no text prompt",
                                "session.audio.input.transcription.prompt")
        if transcription.get("language"):
            if base_language(transcription["language"]) not in self.languages:
                raise RealtimeError(f"language {transcription['language']!r} is not supported by the served model, "
                                    f"which transcribes {', '.join(self.languages)}",
                                    "session.audio.input.transcription.language")
            self.language = base_language(transcription["language"])
        self.model = transcription.get("model") or self.model
        if turn != "unset":
            kind = turn.get("type") if isinstance(turn, dict) else None
            if turn is not None and kind != "server_vad":
                raise RealtimeError("turn_detection must be server_vad (the model's VAD head) or null",
                                    "session.audio.input.turn_detection")
            self.server_vad = turn is not None

    def describe(self, session_id: str) -> dict[str, Any]:
        fmt = {"pcm16": {"type": "audio/pcm", "rate": 24000}, "g711_ulaw": {"type": "audio/pcmu"},
               "g711_alaw": {"type": "audio/pcma"}}[self.format]
        return {"type": "transcription", "id": session_id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": fmt, "noise_reduction": None,
                                    "transcription": {"model": self.model, "language": self.language,
                                                      "prompt": ""},
                                    "turn_detection": {"type": "server_vad"} if self.server_vad else None}},
                "include": None}


class _Decoder:
    def __init__(self, fmt: str):
        self.fmt = fmt
        self.resampler = StreamResampler(24000 if fmt == "pcm16" else 8000)
        self._carry = b""

    def feed(self, data: bytes) -> np.ndarray:
        if self.fmt == "pcm16":
            data = self._carry + data
            usable = len(data) - len(data) % 2
            self._carry = data[usable:]
            return np.frombuffer(data[:usable], "<i2").astype(np.float32) / 32768
        from kyutai_stt.audio.codecs import g711_decode

        return self.resampler.feed(g711_decode(data, "mulaw" if self.fmt == "g711_ulaw" else "alaw"))

    def flush(self) -> np.ndarray:
        out = self.resampler.flush()
        self.resampler = StreamResampler(self.resampler.from_rate)
        return out


@router.websocket("/v1/realtime")
async def realtime_socket(ws: WebSocket) -> None:
    intent = ws.query_params.get("intent")
    session = await open_session(ws, "openai_realtime")
    if session is None:
        return
    events = itertools.count(1)
    items = itertools.count(1)
    markers = itertools.count(1)
    config = _Config(get_service(ws).running_engine.info.languages)
    session_id = "sess_" + uuid.uuid4().hex[:20]
    timeline = Timeline()
    state: dict[str, Any] = {"item": None, "previous": None, "words": [], "drop": False, "delta_sent": False}
    pending_markers: dict[int, str] = {}  # marker id -> "commit" | "clear"
    decoder = _Decoder(config.format)

    async def emit(kind: str, **fields: Any) -> None:
        await ws.send_json({"type": kind, "event_id": f"event_{next(events)}", **fields})

    async def error(message: str, param: str | None = None, code: str = "invalid_value",
                    event_id: str | None = None) -> None:
        await emit("error", error={"type": "invalid_request_error", "code": code, "message": message, "param": param,
                                   "event_id": event_id})

    if intent != "transcription":
        await error("only transcription sessions are served here: connect with ?intent=transcription",
                    "intent", "unsupported_intent")
        session.abort()
        await close(ws, POLICY_VIOLATION, "only intent=transcription is supported")
        return
    await emit("session.created", session=config.describe(session_id))

    def item_id() -> str:
        if state["item"] is None:
            state["item"] = f"item_{next(items)}"
        return state["item"]

    async def end_item() -> None:
        """The current item is over: committed, then its transcript."""
        if state["item"] is None:
            return
        item = state["item"]
        await emit("input_audio_buffer.committed", item_id=item, previous_item_id=state["previous"])
        await emit("conversation.item.input_audio_transcription.completed", item_id=item, content_index=0,
                   transcript=" ".join(state["words"]),
                   usage={"type": "duration", "seconds": round(session.samples_received / SAMPLE_RATE, 3)})
        state["previous"], state["item"], state["words"], state["delta_sent"] = item, None, [], False

    async def receive(session: Session) -> None:
        nonlocal decoder
        while True:
            message = await receive_message(ws, session)
            try:
                event = ClientEvent.validate_json(message.get("text") or message.get("bytes") or b"")
            except ValidationError as exc:
                kind = "unknown"
                first = exc.errors()[0] if exc.errors() else {}
                if first.get("type") == "union_tag_invalid":
                    kind = str(first.get("input", {}).get("type") if isinstance(first.get("input"), dict) else "")
                await error(f"invalid client event ({kind or 'not JSON'}): expected session.update, "
                            "input_audio_buffer.append, .commit or .clear", None, "invalid_event")
                continue
            try:
                if isinstance(event, SessionUpdate):
                    before = config.format
                    config.update(event.session)
                    if config.format != before:
                        session.push_pcm(decoder.flush())
                        decoder = _Decoder(config.format)
                    beta = event.type.startswith("transcription_session")
                    await emit("transcription_session.updated" if beta else "session.updated",
                               session=config.describe(session_id))
                elif isinstance(event, Append):
                    try:
                        data = base64.b64decode(event.audio, validate=True)
                    except (binascii.Error, ValueError):
                        raise RealtimeError("audio must be base64", "audio") from None
                    session.push_pcm(decoder.feed(data))
                elif isinstance(event, Commit):
                    session.push_pcm(decoder.flush())
                    marker = next(markers)
                    pending_markers[marker] = "commit"
                    flush_now(session, marker, timeline)
                elif isinstance(event, Clear):
                    session.push_pcm(decoder.flush())
                    marker = next(markers)
                    pending_markers[marker] = "clear"
                    state["drop"] = True
                    flush_now(session, marker, timeline)
            except RealtimeError as exc:
                await error(str(exc), exc.param, exc.code, event.event_id)
            except SessionLimitError as exc:
                await error(str(exc), None, "session_limit", event.event_id)
                raise CloseSocket(POLICY_VIOLATION, str(exc)) from None

    async def send(session: Session) -> None:
        async for event in session:
            if isinstance(event, Error):
                await error(event.message, None, "server_error")
                raise CloseSocket(INTERNAL_ERROR, event.message)
            if isinstance(event, Marker) and event.id in pending_markers:
                if pending_markers.pop(event.id) == "clear":
                    state["drop"] = False
                    state["item"], state["words"], state["delta_sent"] = None, [], False
                    await emit("input_audio_buffer.cleared")
                else:
                    item_id()
                    await end_item()
                continue
            if state["drop"]:
                continue
            if isinstance(event, Text):
                if state["item"] is None:
                    start = timeline.client_time(event.time)
                    if config.server_vad:
                        await emit("input_audio_buffer.speech_started", item_id=item_id(),
                                   audio_start_ms=round(start * 1000))
                delta = event.text if state["delta_sent"] else event.text.lstrip()
                state["delta_sent"] = True
                await emit("conversation.item.input_audio_transcription.delta", item_id=item_id(), content_index=0,
                           delta=delta)
            elif isinstance(event, Word):
                item_id()
                state["words"].append(event.text)
            elif isinstance(event, EndOfTurn) and config.server_vad and state["item"] is not None:
                await emit("input_audio_buffer.speech_stopped", item_id=state["item"],
                           audio_end_ms=round(timeline.client_time(event.time) * 1000))
                await end_item()

    await serve_session(ws, session, receive, send)
