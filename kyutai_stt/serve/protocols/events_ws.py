"""Our own streaming protocol at ``WS /v1/stream``: audio in, typed JSON events out.

Query parameters choose the audio format: ``format=opus`` (Ogg/Opus pages, the default), ``pcm_f32le`` or
``pcm_s16le`` (raw little-endian at ``sample_rate``, resampled to 24 kHz when needed; ``channels=2`` for
interleaved stereo, mixed down to mono; a stream that declares nothing is mono), ``mulaw``/``alaw`` (raw G.711 at
``sample_rate``, 8000 unless given), an audio container pushed in pieces (``webm`` as a browser's MediaRecorder
records it, ``ogg``, ``mp3``, ``aac``, ``flac``, ``wav``, or ``container`` to let FFmpeg tell; see ``codecs``), and
``steps=true`` to also receive a ``step`` event every 80 ms; ``temperature``, ``seed``, ``keyterms`` choose the
stream's decoding (``ready`` carries the seed of a sampling stream). Any other query parameter is refused (1008). The
messages are declared in ``kyutai_stt.messages.events``. Binary messages carry audio; text messages are JSON controls:
``{"type": "marker", "id": 1}``, ``{"type": "reset"}`` (reset the model's context: a ``reset`` event answers) and
``{"type": "end"}`` (end of audio: the server flushes, sends the last words,
then ``{"type": "end"}`` and closes with 1000). Server messages are the events of ``kyutai_stt.messages.events``.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from kyutai_stt.audio.decoders import stream_decoder
from kyutai_stt.messages.events import (QUERY_ERROR, EndControl, Error, Event, MarkerControl, ResetControl, Step,
    StreamQuery, parse_control)
from kyutai_stt.serve.protocols import runner
from kyutai_stt.serve.protocols.common import open_session, parse_query
from kyutai_stt.serve.service import get_service

router = APIRouter()


class EventsTranslator(runner.Translator):
    """Binary messages are audio in the query's format; text messages are the controls; events go out as JSON."""

    protocol = "events"

    def __init__(self, query: StreamQuery):
        super().__init__(stream_decoder(query.format, query.rate, query.channels))
        self.steps = query.steps

    def parse(self, message: dict) -> list[runner.Input]:
        if message.get("bytes") is not None:
            return [runner.Audio(message["bytes"])]
        match parse_control(message.get("text") or ""):
            case EndControl():
                return [runner.End()]
            case MarkerControl(id=marker_id):
                return [runner.Marker(marker_id)]
            case ResetControl():
                return [runner.ResetContext()]
        return []

    def render(self, event: Event) -> list[str]:
        if isinstance(event, Step) and not self.steps:
            return []
        return [event.model_dump_json()]


@router.websocket("/v1/stream")
async def events_socket(ws: WebSocket) -> None:
    # the query is parsed here, not by FastAPI, so that a bad value gets a close reason rather than a bare HTTP 403
    query = await parse_query(ws, StreamQuery, QUERY_ERROR)
    if query is None:
        return
    decoding = get_service(ws).decoding_options(query.temperature, query.seed, query.keyterm_list)
    session = await open_session(ws, "events", on_full=lambda reason: ws.send_text(Error(message=reason).model_dump_json()),
                                 decoding=decoding)
    if session is None:
        return
    await runner.run_stream(ws, session, EventsTranslator(query))
