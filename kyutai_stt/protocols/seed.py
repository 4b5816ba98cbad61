"""The Modal example's protocol at ``WS /ws``: Ogg/Opus bytes in, ``0x01`` + UTF-8 text pieces out.

An empty binary message ends the audio: the server flushes, sends the remaining text, then ``0x00``, and closes
with 1000. Bytes that are not Ogg/Opus close the socket with 1007.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from ..audio import AudioFormatError, OggOpusDecoder
from ..events import End, Error, Text
from ..session import Session, SessionLimitError
from .common import INVALID_PAYLOAD, POLICY_VIOLATION, UNSUPPORTED_DATA, CloseSocket, open_session, receive_message, serve_session

router = APIRouter()


@router.websocket("/ws")
async def seed_socket(ws: WebSocket) -> None:
    session = await open_session(ws, "seed")
    if session is None:
        return
    decoder = OggOpusDecoder()

    async def receive(session: Session) -> None:
        while True:
            message = await receive_message(ws, session)
            data = message.get("bytes")
            if data is None:
                raise CloseSocket(UNSUPPORTED_DATA, "this endpoint takes binary Ogg/Opus messages, not text")
            if not data:
                session.end()
                return
            try:
                session.push_pcm(decoder.feed(data))
            except AudioFormatError as exc:
                raise CloseSocket(INVALID_PAYLOAD, str(exc)) from None
            except SessionLimitError as exc:
                raise CloseSocket(POLICY_VIOLATION, str(exc)) from None

    async def send(session: Session) -> None:
        async for event in session:
            if isinstance(event, Text):
                await ws.send_bytes(b"\x01" + event.text.encode())
            elif isinstance(event, End):
                await ws.send_bytes(b"\x00")
            elif isinstance(event, Error):
                raise CloseSocket(1011, event.message)

    await serve_session(ws, session, receive, send)
