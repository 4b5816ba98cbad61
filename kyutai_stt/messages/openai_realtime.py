"""OpenAI Realtime transcription's client events (``/v1/realtime?intent=transcription``), declared once.

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
