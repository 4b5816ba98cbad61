"""Our own streaming protocol at ``WS /v1/stream``: audio in, typed JSON events out.

Query parameters choose the audio format: ``format=opus`` (Ogg/Opus pages, the default), ``pcm_f32le`` or
``pcm_s16le`` (raw little-endian at ``sample_rate``, resampled to 24 kHz when needed; ``channels=2`` for
interleaved stereo, mixed down to mono; a stream that declares nothing is mono; with ``multichannel=true``,
``channels`` 2 to 8 are transcribed each on its own, in an engine slot each, and every ``text``, ``word``,
``word_end``, ``step`` and ``end_of_turn`` event carries its ``channel``), ``mulaw``/``alaw`` (raw G.711 at
``sample_rate``, 8000 unless given), an audio container pushed in pieces (``webm`` as a browser's MediaRecorder
records it, ``ogg``, ``mp3``, ``aac``, ``flac``, ``wav``, or ``container`` to let FFmpeg tell; see ``codecs``), and
``steps=true`` to also receive a ``step`` event every 80 ms, the turn layer's ``eot_threshold``,
``eager_eot_threshold``, ``eot_timeout_ms`` (``stream.turns``: ``speech_started``, ``eager_end_of_turn``,
``turn_resumed``, ``end_of_turn``, each end after the turn's last word); ``temperature``, ``seed``, ``keyterms``
choose the stream's decoding (``ready`` carries the seed of a sampling stream). Any other query parameter is refused
(1008). The
messages are declared in ``kyutai_stt.messages.events``. Binary messages carry audio; text messages are JSON controls:
``{"type": "marker", "id": 1}``, ``{"type": "flush", "id": 2}`` (the minimal finalize of ``stream.flush``, as
Deepgram's ``Finalize``: every word of the audio so far, the word in progress closed, then ``flushed`` with the
client's audio time it covers; the stream goes on), ``{"type": "reset"}`` (reset the model's context: a ``reset``
event answers) and ``{"type": "end"}`` (end of audio: the server flushes, sends the last words,
then ``{"type": "end"}`` and closes with 1000). Server messages are the events of ``kyutai_stt.messages.events``;
their times are the client's audio time (the silences of flushes taken out).
"""

from __future__ import annotations

import itertools
import math

from fastapi import APIRouter, WebSocket

from kyutai_stt.audio.decoders import stream_decoder
from kyutai_stt.messages.events import (QUERY_ERROR, EagerEndOfTurn, End, EndControl, EndOfTurn, Error, Event,
    FlushControl, Flushed, Marker, MarkerControl, Reset, ResetControl, SpeechStarted, Step, StreamQuery, Text,
    TurnResumed, Word, WordEnd, parse_control)
from kyutai_stt.serve.protocols import runner
from kyutai_stt.serve.protocols.common import open_session, parse_query
from kyutai_stt.serve.service import get_service
from kyutai_stt.stream.turns import TurnThresholds, TurnTracker

router = APIRouter()

# Markers of the ``flush`` control's flushes: beyond any int64 a client's marker id is (clients' markers are echoed
# as they are, these become ``flushed``).
_FLUSH_MARKERS = 1 << 64
# The time fields of each event, in stream seconds from the session, sent in client seconds.
_TIMES = {Text: "time", Word: "start_time", WordEnd: "stop_time", SpeechStarted: "time", EagerEndOfTurn: "time",
          TurnResumed: "time", EndOfTurn: "time", Reset: "time", End: "duration"}


class EventsTranslator(runner.Translator):
    """Binary messages are audio in the query's format; text messages are the controls; events go out as JSON."""

    protocol = "events"

    def __init__(self, query: StreamQuery, info, default_eot: float):
        super().__init__(stream_decoder(query.format, query.rate, query.channels, split_channels=query.multichannel))
        self.steps = query.steps
        # no flush: the words stay the file's; a multichannel stream's channels are separate speakers, each with its
        # own end of turn from the reader (one tracker would mix their words)
        self.turns = None if query.multichannel else TurnTracker(info, thresholds(query, default_eot))
        self.markers = itertools.count(_FLUSH_MARKERS)
        self.flushes: dict[int, tuple[int | None, float]] = {}  # marker -> (the control's id, client seconds)

    def parse(self, message: dict) -> list[runner.Input]:
        if message.get("bytes") is not None:
            return [runner.Audio(message["bytes"])]
        match parse_control(message.get("text") or ""):
            case EndControl():
                return [runner.End()]
            case MarkerControl(id=marker_id):
                return [runner.Marker(marker_id)]
            case FlushControl(id=flush_id):
                marker = next(self.markers)
                self.flushes[marker] = (flush_id, math.nan)  # where it ends: ``flushed``, once it is fed
                return [runner.Flush(marker)]
            case ResetControl():
                return [runner.ResetContext()]
        return []

    def flushed(self, marker: int, end: float) -> None:
        self.flushes[marker] = (self.flushes[marker][0], end)

    def render(self, event: Event) -> list[str]:
        if isinstance(event, Step) and not self.steps:
            return []
        if isinstance(event, Marker) and event.id in self.flushes:
            flush_id, end = self.flushes.pop(event.id)
            # to the microsecond (the mapping's float noise off: a sample is 42 us)
            return [Flushed(id=flush_id, audio_seconds=round(end, 6)).model_dump_json()]
        field = _TIMES.get(type(event))
        if field is not None and self.timeline.inserted:
            t = self.timeline.client_time(getattr(event, field))
            event = event.model_copy(update={field: round(t, 6) if isinstance(event, End) else t})
        return [event.model_dump_json()]


@router.websocket("/v1/stream")
async def events_socket(ws: WebSocket) -> None:
    # the query is parsed here, not by FastAPI, so that a bad value gets a close reason rather than a bare HTTP 403
    query = await parse_query(ws, StreamQuery, QUERY_ERROR)
    if query is None:
        return
    decoding = get_service(ws).decoding_options(query.temperature, query.seed, query.keyterm_list)
    session = await open_session(ws, "events", on_full=lambda reason: ws.send_text(Error(message=reason).model_dump_json()),
                                 channels=query.channels if query.multichannel else 1, diarize=query.diarize,
                                 decoding=decoding)
    if session is None:
        return
    service = get_service(ws)
    translator = EventsTranslator(query, service.running_engine.info, service.settings.end_of_turn_threshold)
    await runner.run_stream(ws, session, translator)


def thresholds(query: StreamQuery, default_eot: float) -> TurnThresholds:
    eot = default_eot if query.eot_threshold is None else query.eot_threshold
    return TurnThresholds(eot=eot, eager=query.eager_eot_threshold if query.eager_eot_threshold is None
                          else min(query.eager_eot_threshold, eot),
                          timeout_s=math.inf if query.eot_timeout_ms is None else query.eot_timeout_ms / 1000)
