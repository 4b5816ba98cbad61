"""Our own streaming protocol at ``WS /v1/stream``: audio in, typed JSON events out.

Query parameters choose the audio format: ``format=opus`` (Ogg/Opus pages, the default), ``pcm_f32le`` or
``pcm_s16le`` (raw little-endian mono at ``sample_rate``, resampled to 24 kHz when needed), ``mulaw``/``alaw``
(raw G.711 at ``sample_rate``, 8000 unless given), an audio container pushed in pieces (``webm`` as a browser's
MediaRecorder records it, ``ogg``, ``mp3``, ``aac``, ``flac``, ``wav``, or ``container`` to let FFmpeg tell;
see ``codecs``), and ``steps=true``
to also receive a ``step`` event every 80 ms. Binary messages carry audio; text messages are JSON controls:
``{"type": "marker", "id": 1}`` and ``{"type": "end"}`` (end of audio: the server flushes, sends the last words,
then ``{"type": "end"}`` and closes with 1000). Server messages are the events of ``kyutai_stt.events``.
"""

from __future__ import annotations

import json
import re

import numpy as np
from fastapi import APIRouter, WebSocket

from ..audio import AudioFormatError, OggOpusDecoder, StreamResampler
from ..codecs import CONTAINER_FORMATS, stream_decoder
from ..events import Error, Step
from ..session import Session, SessionLimitError
from .common import (INVALID_PAYLOAD, POLICY_VIOLATION, CloseSocket, close, deny_unauthorized, open_session,
                     receive_message, serve_session)

router = APIRouter()

FORMATS = ("opus", "pcm_f32le", "pcm_s16le", "mulaw", "alaw", *CONTAINER_FORMATS)
FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


class _PcmDecoder:
    """Raw little-endian PCM to 24 kHz float. Samples may be split across messages. NaN or infinite samples are
    refused (1007); finite float samples beyond [-1, 1] are clipped to it, as a sound card would."""

    def __init__(self, dtype: str, sample_rate: int):
        self.dtype = np.dtype("<f4" if dtype == "pcm_f32le" else "<i2")
        self.scale = 1.0 if dtype == "pcm_f32le" else 1 / 32768
        self.resampler = StreamResampler(sample_rate)
        self._carry = b""

    def feed(self, data: bytes) -> np.ndarray:
        data = self._carry + data
        usable = len(data) - len(data) % self.dtype.itemsize
        self._carry = data[usable:]
        pcm = np.frombuffer(data[:usable], self.dtype).astype(np.float32) * self.scale
        if not np.all(np.isfinite(pcm)):
            raise AudioFormatError("PCM contains NaN or infinite samples")
        return self.resampler.feed(np.clip(pcm, -1.0, 1.0))

    def flush(self) -> np.ndarray:
        return self.resampler.flush()


@router.websocket("/v1/stream")
async def events_socket(ws: WebSocket, format: str = "opus", sample_rate: str = "24000", steps: str = "false") -> None:
    # the query is parsed here, not by FastAPI, so that a bad value gets a close reason rather than a bare HTTP 403
    rate = int(sample_rate) if re.fullmatch(r"[0-9]{1,9}", sample_rate) else 0
    steps_on = FLAGS.get(steps.lower())
    if format not in FORMATS or not 8000 <= rate <= 192000 or steps_on is None:
        if await deny_unauthorized(ws):
            return
        await ws.accept()
        await close(ws, POLICY_VIOLATION, f"format must be one of {', '.join(FORMATS[:6])}...; "
                    "sample_rate 8000-192000; steps true/false")
        return
    session = await open_session(ws, "events", on_full=lambda reason: ws.send_text(Error(message=reason).model_dump_json()))
    if session is None:
        return
    decoder = (OggOpusDecoder() if format == "opus" else _PcmDecoder(format, rate) if format.startswith("pcm_")
               else stream_decoder(format, rate if "sample_rate" in ws.query_params else 8000))

    async def receive(session: Session) -> None:
        while True:
            message = await receive_message(ws, session)
            try:
                if message.get("bytes") is not None:
                    session.push_pcm(decoder.feed(message["bytes"]))
                    continue
                try:
                    control = json.loads(message.get("text") or "null")
                except (ValueError, RecursionError) as exc:  # bad JSON, too deeply nested, an integer too long
                    raise CloseSocket(INVALID_PAYLOAD, f"invalid JSON control: {exc}") from None
                kind = control.get("type") if isinstance(control, dict) else None
                if kind == "end":
                    if hasattr(decoder, "flush"):
                        session.push_pcm(decoder.flush())
                    session.end()
                    return
                if kind == "marker" and isinstance(control.get("id"), int) and not isinstance(control["id"], bool):
                    session.push_marker(control["id"])
                else:
                    raise CloseSocket(POLICY_VIOLATION, 'unknown control: send {"type": "end"} or {"type": "marker", "id": N}')
            except (AudioFormatError, json.JSONDecodeError) as exc:
                raise CloseSocket(INVALID_PAYLOAD, str(exc)) from None
            except SessionLimitError as exc:
                raise CloseSocket(POLICY_VIOLATION, str(exc)) from None

    async def send(session: Session) -> None:
        async for event in session:
            if isinstance(event, Step) and not steps_on:
                continue
            await ws.send_text(event.model_dump_json())
            if isinstance(event, Error):
                raise CloseSocket(1011, event.message)

    try:
        await serve_session(ws, session, receive, send)
    finally:
        if hasattr(decoder, "close"):
            decoder.close()  # a container decoder's helper thread
