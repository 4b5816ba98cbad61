"""The Modal example's protocol (``WS /ws``): bytes both ways, no framing of its own.

Client to server: binary Ogg/Opus pages, cut anywhere; an empty binary message ends the audio.
Server to client: ``0x01`` + a UTF-8 text piece, as soon as the model emits it; ``0x00`` once every piece is sent.
"""

from __future__ import annotations

from kyutai_stt.messages.events import End, Text

TEXT = b"\x01"
END = b"\x00"
END_OF_AUDIO = b""


def text_message(text: str) -> bytes:
    return TEXT + text.encode()


def parse_server_message(data: bytes, duration: float = 0.0) -> Text | End | None:
    """A server message as our event (``duration``: the audio sent, for ``End``); None for anything else."""
    if data[:1] == TEXT:
        return Text(text=data[1:].decode(), time=0.0)
    if data == END:
        return End(duration=duration)
    return None
