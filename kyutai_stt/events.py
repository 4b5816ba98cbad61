"""What a stream produces: a small set of typed, immutable events.

Every protocol adapter only translates these to its wire format. Times are seconds of the stream's own audio,
corrected for the model's delay.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)


class Ready(_Event):
    type: Literal["ready"] = "ready"


class Text(_Event):
    """A piece of text as soon as the model emits it (``" "`` starts a new word). For the lowest latency."""

    type: Literal["text"] = "text"
    text: str
    time: float


class Word(_Event):
    """A complete word. Final: it never changes once sent."""

    type: Literal["word"] = "word"
    text: str
    start_time: float


class WordEnd(_Event):
    """The end of the last ``Word``: the next word's start, or the end of the audio."""

    type: Literal["word_end"] = "word_end"
    stop_time: float


class Step(_Event):
    """One 80 ms model step for this stream."""

    type: Literal["step"] = "step"
    step_idx: int
    pause_probabilities: tuple[float, ...] | None = None  # per VAD head (0.5, 1, 2, 3 s horizons)
    buffered_samples: int = 0


class EndOfTurn(_Event):
    """VAD head 2's pause probability crossed the threshold after some words: the speaker has likely finished."""

    type: Literal["end_of_turn"] = "end_of_turn"
    probability: float
    time: float


class Marker(_Event):
    """Echo of a client marker: all audio sent before it has been transcribed (model delay included)."""

    type: Literal["marker"] = "marker"
    id: int


class End(_Event):
    """The stream is finished: every word has been sent."""

    type: Literal["end"] = "end"
    duration: float


class Error(_Event):
    type: Literal["error"] = "error"
    message: str


Event = Annotated[
    Union[Ready, Text, Word, WordEnd, Step, EndOfTurn, Marker, End, Error], Field(discriminator="type")
]
