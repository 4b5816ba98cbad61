"""OpenAI's audio transcription answers (``POST /v1/audio/transcriptions``, ``GET /v1/models``), declared once.

Shapes from OpenAI's API reference and the typed models of the ``openai`` SDK (``openai.types.audio``:
``Transcription``, ``TranscriptionVerbose``, ``TranscriptionSegment``, ``TranscriptionWord``), which its clients
parse. Errors: ``{"error": {"message", "type", "param", "code"}}`` (``ErrorBody``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Transcription(BaseModel):
    """``response_format=json``."""

    text: str


class TranscriptionSegment(BaseModel):
    id: int
    seek: int = 0
    start: float
    end: float
    text: str
    tokens: list[int] = []
    temperature: float = 0.0  # decoding is greedy
    avg_logprob: float = 0.0  # the engine reports no token probabilities
    compression_ratio: float = 1.0
    no_speech_prob: float = 0.0


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionVerbose(BaseModel):
    """``response_format=verbose_json``; ``words`` only with ``timestamp_granularities[]=word``."""

    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    words: list[TranscriptionWord] | None = None


class TranscriptionDiarizedSegment(BaseModel):
    """A run of one speaker's words (``openai.types.audio.TranscriptionDiarizedSegment``)."""

    type: Literal["transcript.text.segment"] = "transcript.text.segment"
    id: str
    start: float
    end: float
    text: str
    speaker: str  # "A", "B", ... in order of appearance


class TranscriptionDiarized(BaseModel):
    """``response_format=diarized_json`` (``openai.types.audio.TranscriptionDiarized``)."""

    task: Literal["transcribe"] = "transcribe"
    duration: float
    text: str
    segments: list[TranscriptionDiarizedSegment]


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "kyutai"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, server_error
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
