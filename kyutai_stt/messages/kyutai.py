"""moshi-server's ASR messages (``/api/asr-streaming``): msgpack maps tagged by ``type``.

Declared after moshi-server's ``InMsg``/``OutMsg`` enums (``rust/moshi-server/src/asr.rs``, serde internally
tagged by ``type``). Fields moshi-server does not know are ignored, as serde does.

Client to server (``ClientMessage``): ``Audio{pcm}`` (float32 at 24 kHz, any length; raw little-endian float32
bytes are accepted too), ``OggOpus{data}``, ``Marker{id}``, ``Init``.
Server to client (``ServerMessage``): ``Ready``, ``Word{text, start_time}``, ``EndWord{stop_time}``,
``Step{step_idx, prs, buffered_pcm}``, ``Marker{id}``, ``Error{message}``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgpack
import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PlainSerializer, Tag, TypeAdapter
from pydantic import ValidationError

from kyutai_stt.messages.errors import MessageError, first_error


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)


def _pcm(value: Any) -> np.ndarray:
    """Audio.pcm as float32. NaN or infinite samples are refused; finite samples beyond [-1, 1] are clipped to
    it, as a sound card would."""
    if isinstance(value, (bytes, bytearray)):  # raw little-endian float32 is accepted too
        pcm = np.frombuffer(value[: len(value) // 4 * 4], "<f4").astype(np.float32)
    elif isinstance(value, (list, np.ndarray)):
        try:
            pcm = np.asarray(value, dtype=np.float32)
        except (TypeError, OverflowError) as exc:  # [0.1, {}]: numpy's own words
            raise ValueError(str(exc)) from None
    else:
        raise ValueError("Audio.pcm must be a list of floats")
    if pcm.ndim != 1:
        raise ValueError("Audio.pcm must be a flat list of floats")
    if not np.all(np.isfinite(pcm)):
        raise ValueError("Audio.pcm contains NaN or infinite values")
    return np.clip(pcm, -1.0, 1.0)


def _marker_id(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("Marker.id must be an integer")
    return value


def _opus_data(value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError("OggOpus.data must be bytes")
    return bytes(value)


Pcm = Annotated[np.ndarray, BeforeValidator(_pcm), PlainSerializer(lambda pcm: pcm.tolist())]


# ------------------------------------------------------------------------------------------ client to server
class Audio(_Message):
    type: Literal["Audio"] = "Audio"
    pcm: Pcm = Field(None, validate_default=True)  # absent: refused by _pcm like any other non-list


class OggOpus(_Message):
    type: Literal["OggOpus"] = "OggOpus"
    data: Annotated[bytes, BeforeValidator(_opus_data)] = Field(None, validate_default=True)


class Marker(_Message):
    """In: echo this id once all audio sent before it is transcribed. Out: that echo."""

    type: Literal["Marker"] = "Marker"
    id: Annotated[int, BeforeValidator(_marker_id)] = Field(None, validate_default=True)


class Init(_Message):
    """Asks for (another) ``Ready``."""

    type: Literal["Init"] = "Init"


# ------------------------------------------------------------------------------------------ server to client
class Ready(_Message):
    type: Literal["Ready"] = "Ready"


class Word(_Message):
    type: Literal["Word"] = "Word"
    text: str
    start_time: float  # seconds of the stream's audio


class EndWord(_Message):
    type: Literal["EndWord"] = "EndWord"
    stop_time: float


class Step(_Message):
    """One 80 ms step, sent only by models with VAD heads."""

    type: Literal["Step"] = "Step"
    step_idx: int
    prs: list[float]  # pause probability per VAD head
    buffered_pcm: int  # samples waiting in the server


class Error(_Message):
    type: Literal["Error"] = "Error"
    message: str


def _tag(value: Any) -> str | None:
    tag = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return tag if isinstance(tag, str) else None


ClientMessage = Annotated[
    Union[Annotated[Audio, Tag("Audio")], Annotated[OggOpus, Tag("OggOpus")], Annotated[Marker, Tag("Marker")],
          Annotated[Init, Tag("Init")]],
    Discriminator(_tag),
]
ServerMessage = Annotated[
    Union[Annotated[Ready, Tag("Ready")], Annotated[Word, Tag("Word")], Annotated[EndWord, Tag("EndWord")],
          Annotated[Step, Tag("Step")], Annotated[Marker, Tag("Marker")], Annotated[Error, Tag("Error")]],
    Discriminator(_tag),
]
_client_messages: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
_server_messages: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


def _parse(adapter: TypeAdapter, data: bytes):
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.StackError) as exc:  # ExtraData, FormatError: ValueErrors
        raise MessageError(f"malformed msgpack ({exc or type(exc).__name__})") from None
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        if error["type"] == "union_tag_not_found":
            raise MessageError("each message must be a msgpack map with a 'type'") from None
        if error["type"] == "union_tag_invalid":
            raise MessageError(f"unknown message type {str(error['ctx']['tag'])[:40]!r}") from None
        raise MessageError(first_error(exc)) from None


def parse_client_message(data: bytes) -> Audio | OggOpus | Marker | Init:
    """A client's binary frame as its message; ``MessageError`` with the reason when it is not one."""
    return _parse(_client_messages, data)


def parse_server_message(data: bytes) -> Ready | Word | EndWord | Step | Marker | Error:
    """A server's binary frame as its message (our client); ``MessageError`` when it is not one."""
    return _parse(_server_messages, data)


def pack(message: _Message, single_float: bool = False) -> bytes:
    """A message as one msgpack frame (``single_float``: floats as float32, as Kyutai's clients send audio)."""
    return msgpack.packb(message.model_dump(), use_bin_type=True, use_single_float=single_float)
