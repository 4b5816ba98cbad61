"""Our JSON events protocol (``WS /v1/stream``), declared once: the events a stream produces (the server's
messages, a union tagged by ``type``), the query and the client controls.

Events: every protocol adapter only translates these to its wire format. Times are seconds of the stream's own
audio, corrected for the model's delay.

Query (``StreamQuery``): ``format`` (``opus``: Ogg/Opus pages, the default; ``pcm_f32le`` / ``pcm_s16le``: raw
little-endian PCM), ``sample_rate`` of raw PCM (8000 to 192000, resampled to 24 kHz), ``channels`` of raw PCM (1,
the default, or 2: interleaved stereo, mixed down to mono; Ogg/Opus declares its own), ``multichannel`` (with
``channels`` 2 to 8 of raw PCM: each channel is transcribed on its own, in a slot of its own, and its events carry
``channel``), ``diarize`` (words carry ``speaker``: needs a server started with ``--diarizer``), ``steps`` (also send a
``step`` event every 80 ms), the turn layer's thresholds (``eot_threshold``, ``eager_eot_threshold``,
``eot_timeout_ms``: ``speech_started``, ``eager_end_of_turn``, ``turn_resumed``, ``end_of_turn``), the decoding
controls ``temperature``, ``seed`` and ``keyterms`` (comma-separated), and the API key (``api_key`` / ``auth_id``).
Any other parameter is refused.

Client controls (text frames, ``Control``): ``{"type": "marker", "id": N}``, ``{"type": "flush"}`` (optional ``id``:
every word of the audio so far, then ``flushed``; the stream goes on), ``{"type": "reset"}`` (reset the model's
context), ``{"type": "end"}``.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError, model_serializer,
    model_validator)

from kyutai_stt.audio.constants import CONTAINER_FORMATS as _CONTAINERS
from kyutai_stt.messages.errors import MessageError, UnknownMessage


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)


def _tag(description: str):
    """An optional tag of an event, absent from its JSON unless set (so untagged streams look as they always did)."""
    return Field(None, description=description, exclude_if=lambda value: value is None)


CHANNEL = "the audio channel it belongs to (0-based), on multichannel streams only"
SPEAKER = "who said it (0-based, in order of first appearance), on diarized streams only"


class Ready(_Event):
    type: Literal["ready"] = "ready"
    seed: int | None = None  # a sampling stream's seed (give it back as ``seed`` to reproduce the run); else absent

    @model_serializer(mode="wrap")
    def _seed_only_when_sampling(self, handler):
        data = handler(self)
        if data.get("seed") is None:
            data.pop("seed", None)
        return data


class Reset(_Event):
    """The model's context was reset from ``time`` on (the stall watchdog, or the client's ``reset`` control):
    the words before are kept, the times go on."""

    type: Literal["reset"] = "reset"
    time: float
    reason: Literal["stall", "client"]


class Text(_Event):
    """A piece of text as soon as the model emits it (``" "`` starts a new word). For the lowest latency."""

    type: Literal["text"] = "text"
    text: str
    time: float
    channel: int | None = _tag(CHANNEL)


class Word(_Event):
    """A complete word. Final: it never changes once sent."""

    type: Literal["word"] = "word"
    text: str
    start_time: float
    channel: int | None = _tag(CHANNEL)
    speaker: int | None = _tag(SPEAKER)


class WordEnd(_Event):
    """The end of the last ``Word``: the next word's start, or the end of the audio."""

    type: Literal["word_end"] = "word_end"
    stop_time: float
    channel: int | None = _tag(CHANNEL)


class Step(_Event):
    """One 80 ms model step for this stream."""

    type: Literal["step"] = "step"
    step_idx: int
    pause_probabilities: tuple[float, ...] | None = None  # per VAD head (0.5, 1, 2, 3 s horizons)
    buffered_samples: int = 0
    channel: int | None = _tag(CHANNEL)


class SpeechStarted(_Event):
    """A turn starts: the first text since the last end of turn (``stream.turns``)."""

    type: Literal["speech_started"] = "speech_started"
    time: float


class EagerEndOfTurn(_Event):
    """The pause probability crossed the eager threshold (``eager_eot_threshold``): the speaker may have finished.
    Either ``turn_resumed`` or ``end_of_turn`` follows."""

    type: Literal["eager_end_of_turn"] = "eager_end_of_turn"
    probability: float
    time: float


class TurnResumed(_Event):
    """Text came after an ``eager_end_of_turn``: the turn goes on."""

    type: Literal["turn_resumed"] = "turn_resumed"
    time: float


class EndOfTurn(_Event):
    """VAD head 2's pause probability crossed the threshold after some words: the speaker has likely finished.
    Every word of the turn came before it. ``trigger``: ``model`` (the VAD head), ``timeout`` (no text for
    ``eot_timeout_ms``) or ``manual`` (the client ended the turn)."""

    type: Literal["end_of_turn"] = "end_of_turn"
    probability: float
    time: float
    trigger: Literal["model", "timeout", "manual"] = "model"
    channel: int | None = _tag(CHANNEL)


class Marker(_Event):
    """Echo of a client marker: all audio sent before it has been transcribed (model delay included)."""

    type: Literal["marker"] = "marker"
    id: int


class Flushed(_Event):
    """Answer to a ``flush`` control (its ``id``, null when it had none): every word of the client's first
    ``audio_seconds`` of audio came before it, the word in progress closed there (``stream.flush``). The stream
    goes on."""

    type: Literal["flushed"] = "flushed"
    id: int | None = None
    audio_seconds: float


class End(_Event):
    """The stream is finished: every word has been sent."""

    type: Literal["end"] = "end"
    duration: float


class Error(_Event):
    type: Literal["error"] = "error"
    message: str


Event = Annotated[
    Union[Ready, Text, Word, WordEnd, Step, SpeechStarted, EagerEndOfTurn, TurnResumed, EndOfTurn, Marker,
          Flushed, End, Error, Reset], Field(discriminator="type")
]


PCM_FORMATS = ("pcm_f32le", "pcm_s16le")
MAX_CHANNELS = 8  # multichannel: each channel takes an engine slot
G711_FORMATS = ("mulaw", "alaw")
# audio containers pushed in pieces ("container"/"auto": FFmpeg tells)
CONTAINER_FORMATS = tuple(_CONTAINERS)
FORMATS = ("opus", *PCM_FORMATS, *G711_FORMATS, *CONTAINER_FORMATS)
# a close reason fits in 123 bytes: the full list of formats is in the README
QUERY_ERROR = ("format must be one of opus, pcm_f32le, pcm_s16le, mulaw, alaw, webm...; sample_rate 8000-192000; "
               "steps, eot_* see README")


class StreamQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[FORMATS] = "opus"  # type: ignore[valid-type]
    # of raw PCM, or of G.711 (8000 when not given); "16000.5" or "abc" are refused
    sample_rate: int = Field(24000, ge=8000, le=192000)
    # of raw PCM (interleaved): 2 is stereo, mixed down to mono unless ``multichannel``
    channels: int = Field(1, ge=1, le=MAX_CHANNELS)
    multichannel: bool = False  # transcribe each channel on its own (one engine slot each), events tagged ``channel``
    diarize: bool = False  # words carry ``speaker`` (needs a server started with a diarizer)
    steps: bool = False  # true/false, 1/0, yes/no, on/off
    # the turn layer (``stream.turns``): pause probability of the VAD head that ends a turn (None: the server's
    # ``end_of_turn_threshold``), of an eager end (None: no eager ends), and an end after this much time without
    # new text (None: none)
    eot_threshold: float | None = Field(None, ge=0.0, le=1.0)
    eager_eot_threshold: float | None = Field(None, ge=0.0, le=1.0)
    eot_timeout_ms: int | None = Field(None, ge=100, le=600_000)
    api_key: str | None = None
    auth_id: str | None = None
    # decoding: temperature 0 (greedy) to 2, the server's default_temperature when not given; seed 0 to 2**32-1
    # (random when not given, sent back in ``ready``); keyterms: comma-separated terms to favour
    temperature: float | None = None
    seed: int | None = None
    keyterms: str = ""

    @model_validator(mode="before")
    @classmethod
    def _decoding_numbers(cls, data):
        """A temperature or seed that is no number gets its own close reason (not the format list)."""
        if isinstance(data, dict):
            for name, kind, message in (("temperature", float, "temperature must be between 0 (greedy) and 2"),
                                        ("seed", int, "seed must be an integer from 0 to 4294967295")):
                if data.get(name) is not None:
                    try:
                        kind(data[name])
                    except (TypeError, ValueError):
                        raise ValueError(message) from None
        return data

    @property
    def keyterm_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.keyterms.split(",") if t.strip())

    @model_validator(mode="after")
    def _fields_of_raw_audio(self) -> "StreamQuery":
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 (greedy) and 2")
        if self.seed is not None and not 0 <= self.seed <= 2**32 - 1:
            raise ValueError("seed must be an integer from 0 to 4294967295")
        if len(self.keyterm_list) > 300 or any(len(t) > 64 for t in self.keyterm_list):
            raise ValueError("keyterms: at most 300 comma-separated terms of at most 64 characters")
        if self.format not in PCM_FORMATS and "channels" in self.model_fields_set and self.channels != 1:
            raise ValueError("channels applies to raw PCM: other formats declare their own (stereo is mixed down)")
        if self.multichannel and (self.format not in PCM_FORMATS or self.channels < 2):
            raise ValueError("multichannel needs raw PCM (pcm_f32le or pcm_s16le) with channels of 2 or more")
        if self.channels > 2 and not self.multichannel:
            raise ValueError("more than 2 channels needs multichannel=true (each channel is transcribed on its own)")
        if self.format in CONTAINER_FORMATS and "sample_rate" in self.model_fields_set:
            raise ValueError("sample_rate applies to raw PCM and G.711: an audio container declares its own")
        if self.eager_eot_threshold is not None and self.eot_threshold is not None \
                and self.eager_eot_threshold > self.eot_threshold:
            raise ValueError("eager_eot_threshold must not be above eot_threshold")
        return self

    @property
    def rate(self) -> int:
        """The raw audio's sample rate: as given, else 24000 for PCM and 8000 for G.711 (telephony)."""
        if self.format in G711_FORMATS and "sample_rate" not in self.model_fields_set:
            return 8000
        return self.sample_rate


class MarkerControl(BaseModel):
    """Echo ``id`` back once all audio sent before it is transcribed."""

    type: Literal["marker"] = "marker"
    id: StrictInt  # not 1.5, true or "7"


class EndControl(BaseModel):
    """No more audio: the server flushes, sends the last words, then ``end``, and closes with 1000."""

    type: Literal["end"] = "end"


class FlushControl(BaseModel):
    """Transcribe the audio so far now without ending the stream: its words, the last one closed, then
    ``flushed`` (with this ``id``)."""

    type: Literal["flush"] = "flush"
    id: StrictInt | None = None


class ResetControl(BaseModel):
    """Reset the model's context now (a stalled transcript); answered by a ``reset`` event."""

    type: Literal["reset"] = "reset"


Control = Annotated[Union[MarkerControl, FlushControl, EndControl, ResetControl], Field(discriminator="type")]
_controls: TypeAdapter[Control] = TypeAdapter(Control)
_events: TypeAdapter[Event] = TypeAdapter(Event)

UNKNOWN_CONTROL = ('unknown control: send {"type": "end"}, {"type": "flush"}, {"type": "reset"} or '
                   '{"type": "marker", "id": N}')


def parse_control(text: str) -> MarkerControl | FlushControl | EndControl | ResetControl:
    """A client's text frame as its control. ``MessageError`` (1007) when it is not JSON, ``UnknownMessage``
    (1008) when it is JSON but no control."""
    try:
        control = json.loads(text or "null")
    except (ValueError, RecursionError) as exc:  # bad JSON, too deeply nested, an integer too long
        raise MessageError(f"invalid JSON control: {exc}") from None
    try:
        return _controls.validate_python(control)
    except ValidationError:
        raise UnknownMessage(UNKNOWN_CONTROL) from None


def parse_event(data: str | bytes) -> Event:
    """A server's message (our client)."""
    return _events.validate_json(data)
