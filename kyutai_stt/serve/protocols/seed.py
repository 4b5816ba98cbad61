"""The Modal example's protocol at ``WS /ws``: Ogg/Opus bytes in, ``0x01`` + UTF-8 text pieces out.

An empty binary message ends the audio: the server flushes, sends the remaining text, then ``0x00``, and closes
with 1000. Bytes that are not Ogg/Opus close the socket with 1007. Messages: ``kyutai_stt.messages.seed``.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from kyutai_stt.audio.decoders import OPUS, stream_decoder
from kyutai_stt.messages import seed as wire
from kyutai_stt.messages.events import End, Event, Text
from kyutai_stt.serve.protocols import runner
from kyutai_stt.serve.protocols.common import AuthQuery, open_session, parse_query
from kyutai_stt.serve.protocols.errors import UnsupportedData

router = APIRouter()


class SeedTranslator(runner.Translator):
    protocol = "seed"

    def __init__(self):
        super().__init__(stream_decoder(OPUS))

    def parse(self, message: dict) -> list[runner.Input]:
        data = message.get("bytes")
        if data is None:
            raise UnsupportedData("this endpoint takes binary Ogg/Opus messages, not text")
        return [runner.End()] if data == wire.END_OF_AUDIO else [runner.Audio(data)]

    def render(self, event: Event) -> list[bytes]:
        if isinstance(event, Text):
            return [wire.text_message(event.text)]
        if isinstance(event, End):
            return [wire.END]
        return []


@router.websocket("/ws")
async def seed_socket(ws: WebSocket) -> None:
    if await parse_query(ws, AuthQuery) is None:
        return
    session = await open_session(ws, "seed")
    if session is None:
        return
    await runner.run_stream(ws, session, SeedTranslator())
