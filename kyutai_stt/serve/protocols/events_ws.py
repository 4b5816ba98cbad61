"""Our own streaming protocol at ``WS /v1/stream``: audio in, typed JSON events out.

Query parameters choose the audio format: ``format=opus`` (Ogg/Opus pages, the default), ``pcm_f32le`` or
``pcm_s16le`` (raw little-endian at ``sample_rate``, resampled to 24 kHz when needed; ``channels=2`` for
interleaved stereo, mixed down to mono; a stream that declares nothing is mono), ``mulaw``/``alaw`` (raw G.711 at
``sample_rate``, 8000 unless given), an audio container pushed in pieces (``webm`` as a browser's MediaRecorder
records it, ``ogg``, ``mp3``, ``aac``, ``flac``, ``wav``, or ``container`` to let FFmpeg tell; see ``codecs``), and
``steps=true`` to also receive a ``step`` event every 80 ms. Any other query parameter is refused (1008). The
messages are declared in ``kyutai_stt.messages.events``. Binary messages carry audio; text messages are JSON controls:
``{"type": "marker", "id": 1}`` and ``{"type": "end"}`` (end of audio: the server flushes, sends the last words,
then ``{"type": "end"}`` and closes with 1000). Server messages are the events of ``kyutai_stt.messages.events``.
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, WebSocket

from kyutai_stt.audio.decode import AudioFormatError, OggOpusDecoder, StreamResampler
from kyutai_stt.audio.codecs import stream_decoder
from kyutai_stt.messages.events import Error, Step
from kyutai_stt.messages.events import QUERY_ERROR, EndControl, MarkerControl, StreamQuery, parse_control
from kyutai_stt.stream.session import Session
from kyutai_stt.serve.protocols.common import open_session, parse_query, receive_message, serve_session
from kyutai_stt.serve.protocols.errors import ServerFault

router = APIRouter()


class PcmDecoder:
    """Raw little-endian PCM (``channels`` interleaved) to 24 kHz mono float. Samples may be split across
    messages. Stereo is mixed down to mono (the mean of the two channels), as the Ogg/Opus decoder does. NaN or
    infinite samples are refused (1007); finite float samples beyond [-1, 1] are clipped to it, as a sound card
    would."""

    def __init__(self, dtype: str, sample_rate: int, channels: int = 1):
        self.dtype = np.dtype("<f4" if dtype == "pcm_f32le" else "<i2")
        self.scale = 1.0 if dtype == "pcm_f32le" else 1 / 32768
        self.channels = channels
        self.resampler = StreamResampler(sample_rate)
        self._carry = b""

    def feed(self, data: bytes) -> np.ndarray:
        data = self._carry + data
        frame = self.dtype.itemsize * self.channels  # one sample of every channel
        usable = len(data) - len(data) % frame
        self._carry = data[usable:]
        pcm = np.frombuffer(data[:usable], self.dtype).astype(np.float32) * self.scale
        if not np.all(np.isfinite(pcm)):
            raise AudioFormatError("PCM contains NaN or infinite samples")
        if self.channels > 1:
            pcm = pcm.reshape(-1, self.channels).mean(axis=1)
        return self.resampler.feed(np.clip(pcm, -1.0, 1.0))

    def flush(self) -> np.ndarray:
        return self.resampler.flush()


@router.websocket("/v1/stream")
async def events_socket(ws: WebSocket) -> None:
    # the query is parsed here, not by FastAPI, so that a bad value gets a close reason rather than a bare HTTP 403
    query = await parse_query(ws, StreamQuery, QUERY_ERROR)
    if query is None:
        return
    session = await open_session(ws, "events", on_full=lambda reason: ws.send_text(Error(message=reason).model_dump_json()))
    if session is None:
        return
    if query.format == "opus":
        decoder = OggOpusDecoder()
    elif query.format.startswith("pcm_"):
        decoder = PcmDecoder(query.format, query.rate, query.channels)
    else:  # G.711 or an audio container
        decoder = stream_decoder(query.format, query.rate)

    async def receive(session: Session) -> None:
        while True:
            message = await receive_message(ws, session)
            if message.get("bytes") is not None:
                session.push_pcm(decoder.feed(message["bytes"]))
                continue
            match parse_control(message.get("text") or ""):
                case EndControl():
                    if hasattr(decoder, "flush"):
                        session.push_pcm(decoder.flush())
                    session.end()
                    return
                case MarkerControl(id=marker_id):
                    session.push_marker(marker_id)

    async def send(session: Session) -> None:
        async for event in session:
            if isinstance(event, Step) and not query.steps:
                continue
            await ws.send_text(event.model_dump_json())
            if isinstance(event, Error):
                raise ServerFault(event.message)

    try:
        await serve_session(ws, session, receive, send)
    finally:
        if hasattr(decoder, "close"):
            decoder.close()  # a container decoder's helper thread
