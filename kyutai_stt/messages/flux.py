"""Deepgram Flux's conversational speech-to-text messages (``WS /v2/listen``), declared once.

Shapes from the typed models of deepgram-sdk 7 (``deepgram.listen.v2.types``) and developers.deepgram.com/docs/flux:
what the SDK's ``listen.v2``, Pipecat's ``DeepgramFluxSTTService`` and LiveKit's ``STTv2`` read.
Client controls (text frames): ``Configure`` (thresholds mid-stream), ``ForceEndTurn``, ``CloseStream``. Server
messages: ``Connected``, ``TurnInfo`` (``event``: StartOfTurn, Update, EagerEndOfTurn, TurnResumed, EndOfTurn),
``ConfigureSuccess`` / ``ConfigureFailure``, ``FatalError`` (Flux's ``Error``). Every server message has a
``sequence_id`` counting from 0.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class Thresholds(BaseModel):
    """Flux's ranges: eot 0.5-1.0 (1.0: only ForceEndTurn ends a turn), eager 0.3-0.9 (and not above eot), timeout 500-10000 ms."""

    model_config = ConfigDict(extra="forbid")

    eot_threshold: float | None = Field(None, ge=0.5, le=1.0)
    eager_eot_threshold: float | None = Field(None, ge=0.3, le=0.9)
    eot_timeout_ms: int | None = Field(None, ge=500, le=10000)


class Configure(BaseModel):
    """Change the thresholds from now on (the ones not given stay). Keyterms and language hints are refused."""

    type: Literal["Configure"]
    thresholds: Thresholds | None = None
    keyterms: list[str] | None = None
    language_hints: list[str] | None = None
    numerals: bool | None = None


class ForceEndTurn(BaseModel):
    type: Literal["ForceEndTurn"]


class CloseStream(BaseModel):
    type: Literal["CloseStream"]


Control = TypeAdapter(Annotated[Union[Configure, ForceEndTurn, CloseStream], Field(discriminator="type")])


class _ServerMessage(BaseModel):
    sequence_id: int = 0  # set when sent


class Connected(_ServerMessage):
    type: Literal["Connected"] = "Connected"
    request_id: str


class TurnWord(BaseModel):
    word: str
    confidence: float = 1.0  # greedy decoding: the engine reports no token probabilities


class TurnInfo(_ServerMessage):
    type: Literal["TurnInfo"] = "TurnInfo"
    request_id: str
    event: Literal["StartOfTurn", "Update", "EagerEndOfTurn", "TurnResumed", "EndOfTurn"]
    turn_index: int
    audio_window_start: float
    audio_window_end: float
    transcript: str
    words: list[TurnWord]
    end_of_turn_confidence: float
    trigger: str | None = None  # EndOfTurn only: model, manual, timeout


class ConfiguredThresholds(BaseModel):
    eot_threshold: float
    eager_eot_threshold: float | None = None
    eot_timeout_ms: int


class ConfigureSuccess(_ServerMessage):
    type: Literal["ConfigureSuccess"] = "ConfigureSuccess"
    request_id: str
    thresholds: ConfiguredThresholds
    keyterms: list[str] = []


class ConfigureFailure(_ServerMessage):
    type: Literal["ConfigureFailure"] = "ConfigureFailure"
    request_id: str
    code: str
    description: str


class FatalError(_ServerMessage):
    type: Literal["Error"] = "Error"
    code: str
    description: str
