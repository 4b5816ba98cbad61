"""OpenAI Realtime transcription's client and server events (``/v1/realtime?intent=transcription``), declared once.

From the ``openai`` SDK's types (``openai.types.realtime``, and the beta names of ``openai.types.beta.realtime``):
``session.update`` / ``transcription_session.update`` (the session object is checked by the adapter, since GA and
beta shape it differently), ``input_audio_buffer.append`` (base64 audio), ``.commit``, ``.clear``. Unknown
fields are kept (``extra="allow"``), as OpenAI's server tolerates them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class SessionUpdate(_Loose):
    type: Literal["session.update", "transcription_session.update"]
    event_id: str | None = None
    session: dict[str, Any] = {}


class Append(_Loose):
    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str


class Commit(_Loose):
    type: Literal["input_audio_buffer.commit"]
    event_id: str | None = None


class Clear(_Loose):
    type: Literal["input_audio_buffer.clear"]
    event_id: str | None = None


ClientEvent = TypeAdapter(Annotated[Union[SessionUpdate, Append, Commit, Clear], Field(discriminator="type")])


# ------------------------------------------------------------------------------ server events
# The shapes of ``openai.types.realtime`` (GA) that a transcription session sends. ``event_id`` is numbered by the
# adapter; times are milliseconds of the client's audio.

class PcmFormat(BaseModel):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: int = 24000


class G711Format(BaseModel):
    type: Literal["audio/pcmu", "audio/pcma"]


class Transcription(BaseModel):
    model: str
    language: str | None = None
    prompt: str = ""
    keywords: list[str] | None = None


class TurnDetection(BaseModel):
    type: Literal["server_vad"] = "server_vad"
    threshold: float = 0.5
    silence_duration_ms: int | None = None  # the horizon of the VAD head read
    prefix_padding_ms: int = 0


class SemanticTurnDetection(BaseModel):
    type: Literal["semantic_vad"] = "semantic_vad"
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"


class AudioInput(BaseModel):
    format: PcmFormat | G711Format
    noise_reduction: None = None
    transcription: Transcription
    turn_detection: TurnDetection | SemanticTurnDetection | None


class SessionAudio(BaseModel):
    input: AudioInput


class TranscriptionSession(BaseModel):
    """The session as configured, in ``session.created`` / ``session.updated``."""

    type: Literal["transcription"] = "transcription"
    id: str
    object: Literal["realtime.transcription_session"] = "realtime.transcription_session"
    audio: SessionAudio
    include: None = None


class _ServerEvent(BaseModel):
    event_id: str = ""  # set by the adapter when sent


class SessionCreated(_ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: TranscriptionSession


class SessionUpdated(_ServerEvent):
    type: Literal["session.updated", "transcription_session.updated"] = "session.updated"
    session: TranscriptionSession


class ErrorDetail(BaseModel):
    type: Literal["invalid_request_error"] = "invalid_request_error"
    code: str
    message: str
    param: str | None = None
    event_id: str | None = None  # the client event it answers


class ServerError(_ServerEvent):
    type: Literal["error"] = "error"
    error: ErrorDetail


class SpeechStarted(_ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    item_id: str
    audio_start_ms: int


class SpeechStopped(_ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    item_id: str
    audio_end_ms: int


class Committed(_ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None


class InputAudio(BaseModel):
    type: Literal["input_audio"] = "input_audio"
    transcript: str | None = None  # None until the item's transcription is completed


class UserItem(BaseModel):
    """A committed item: the user's audio (never sent back) and, once done, its transcript."""
    id: str
    object: Literal["realtime.item"] = "realtime.item"
    type: Literal["message"] = "message"
    role: Literal["user"] = "user"
    status: Literal["completed"] = "completed"
    content: list[InputAudio]


class ItemAdded(_ServerEvent):
    """Right after ``committed``; the beta API's name is ``conversation.item.created``."""
    type: Literal["conversation.item.added", "conversation.item.created"] = "conversation.item.added"
    previous_item_id: str | None
    item: UserItem


class ItemDone(_ServerEvent):
    """Right after ``completed``: the item with its transcript (GA only)."""
    type: Literal["conversation.item.done"] = "conversation.item.done"
    previous_item_id: str | None
    item: UserItem


class Cleared(_ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class TranscriptionDelta(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.delta"] = \
        "conversation.item.input_audio_transcription.delta"
    item_id: str
    content_index: int = 0
    delta: str


class Usage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionCompleted(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.completed"] = \
        "conversation.item.input_audio_transcription.completed"
    item_id: str
    content_index: int = 0
    transcript: str
    usage: Usage


ServerEvent = Union[SessionCreated, SessionUpdated, ServerError, SpeechStarted, SpeechStopped, Committed, Cleared,
                    ItemAdded, ItemDone, TranscriptionDelta, TranscriptionCompleted]
