"""The Modal example's protocol at ``WS /ws``: Ogg/Opus bytes in, ``0x01`` + UTF-8 text pieces out.

An empty binary message ends the audio: the server flushes, sends the remaining text, then ``0x00``, and closes
with 1000. Bytes that are not Ogg/Opus close the socket with 1007. Messages: ``kyutai_stt.messages.seed``.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from kyutai_stt.audio.decode import OggOpusDecoder
from kyutai_stt.messages.events import End, Error, Text
from kyutai_stt.messages import seed as wire
from kyutai_stt.stream.session import Session
from kyutai_stt.serve.protocols.common import AuthQuery, open_session, parse_query, receive_message, serve_session
from kyutai_stt.serve.protocols.errors import ServerFault, UnsupportedData

router = APIRouter()


@router.websocket("/ws")
async def seed_socket(ws: WebSocket) -> None:
    if await parse_query(ws, AuthQuery) is None:
        return
    session = await open_session(ws, "seed")
    if session is None:
        return
    decoder = OggOpusDecoder()

    async def receive(session: Session) -> None:
        while True:
            data = (await receive_message(ws, session)).get("bytes")
            if data is None:
                raise UnsupportedData("this endpoint takes binary Ogg/Opus messages, not text")
            if data == wire.END_OF_AUDIO:
                session.end()
                return
            session.push_pcm(decoder.feed(data))  # AudioFormatError: 1007, SessionLimitError: 1008

    async def send(session: Session) -> None:
        async for event in session:
            if isinstance(event, Text):
                await ws.send_bytes(wire.text_message(event.text))
            elif isinstance(event, End):
                await ws.send_bytes(wire.END)
            elif isinstance(event, Error):
                raise ServerFault(event.message)

    await serve_session(ws, session, receive, send)
