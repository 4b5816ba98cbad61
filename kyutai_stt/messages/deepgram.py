"""Deepgram's live and pre-recorded speech-to-text messages (``/v1/listen``), declared once.

Shapes from Deepgram's public API reference (developers.deepgram.com/reference/speech-to-text/listen-streaming)
and the typed models of deepgram-sdk 7 (``deepgram.listen.v1.types``): what its clients, LiveKit's and Pipecat's
read. Client controls (text frames, ``Control``): ``KeepAlive``, ``Finalize``, ``CloseStream``. Server messages:
``Results``, ``SpeechStarted``, ``UtteranceEnd``, ``Metadata``, ``StreamError`` (Deepgram's ``Error``).
Pre-recorded: ``PrerecordedResponse``; errors over HTTP: ``RestError``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter


class KeepAlive(BaseModel):
    type: Literal["KeepAlive"]


class Finalize(BaseModel):
    type: Literal["Finalize"]


class CloseStream(BaseModel):
    type: Literal["CloseStream"]


Control = TypeAdapter(Annotated[Union[KeepAlive, Finalize, CloseStream], Field(discriminator="type")])


class ResultWord(BaseModel):
    word: str
    start: float
    end: float
    confidence: float = 1.0
    punctuated_word: str
    # diarize=true only (absent otherwise, as Deepgram sends it)
    speaker: int | None = Field(None, exclude_if=lambda value: value is None)


class Alternative(BaseModel):
    transcript: str
    confidence: float = 1.0
    words: list[ResultWord]


class ResultChannel(BaseModel):
    alternatives: list[Alternative]


class ModelInfo(BaseModel):
    name: str
    version: str = "latest"
    arch: str = "kyutai-stt"


class ResultMetadata(BaseModel):
    request_id: str
    model_info: ModelInfo
    model_uuid: str


class Results(BaseModel):
    type: Literal["Results"] = "Results"
    channel_index: list[int] = [0, 1]
    duration: float
    start: float
    is_final: bool
    speech_final: bool = False
    from_finalize: bool = False
    channel: ResultChannel
    metadata: ResultMetadata


class SpeechStarted(BaseModel):
    type: Literal["SpeechStarted"] = "SpeechStarted"
    channel: list[int] = [0, 1]
    timestamp: float


class UtteranceEnd(BaseModel):
    type: Literal["UtteranceEnd"] = "UtteranceEnd"
    channel: list[int] = [0, 1]
    last_word_end: float


class Metadata(BaseModel):
    type: Literal["Metadata"] = "Metadata"
    transaction_key: str = "deprecated"
    request_id: str
    sha256: str
    created: str
    duration: float
    channels: int = 1
    models: list[str]
    model_info: dict[str, ModelInfo]


class StreamError(BaseModel):
    type: Literal["Error"] = "Error"
    variant: str
    description: str
    message: str


# ------------------------------------------------------------------------------------------ pre-recorded (REST)
class PrerecordedMetadata(BaseModel):
    transaction_key: str = "deprecated"
    request_id: str
    sha256: str
    created: str
    duration: float
    channels: int = 1
    models: list[str]
    model_info: dict[str, ModelInfo]


class PrerecordedChannel(BaseModel):
    alternatives: list[Alternative]


class PrerecordedResults(BaseModel):
    channels: list[PrerecordedChannel]


class PrerecordedResponse(BaseModel):
    """The answer of ``POST /v1/listen`` (deepgram-sdk's ``ListenV1Response``)."""

    metadata: PrerecordedMetadata
    results: PrerecordedResults


class RestError(BaseModel):
    """Deepgram's REST error body: refused query parameters (at a WebSocket's handshake too) and failed uploads."""

    err_code: str
    err_msg: str
    request_id: str
