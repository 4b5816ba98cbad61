"""Test helpers: expected events from the reference, and real protocol clients."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import websockets

from kyutai_stt.audio.decode import OggOpusDecoder, encode_ogg_opus
from kyutai_stt.messages.events import Text, Word, WordEnd
from kyutai_stt.stream.words import WordAssembler, pair_words


def expected_events(model, outputs, audio_seconds: float | None = None) -> list:
    """Text/Word/WordEnd events a stream must produce, from reference outputs (as session.py assembles them).

    Times are capped at the end of the audio (``audio_seconds``, or the ``audio_seconds`` that
    ``conftest.Reference.outputs`` attaches): once the client's audio is all in, the session knows its length."""
    assembler = WordAssembler(model.tokenizer.id_to_piece, model.delay_frames + model.prefix_frames)
    end = audio_seconds if audio_seconds is not None else getattr(outputs, "audio_seconds", None)
    # The session learns the length at end of stream; every event before the flush has an earlier time anyway.
    if end is not None:
        assembler.audio_end = end
    events = []
    for out in outputs:
        events += assembler.feed(out.frame, out.token)
    events += assembler.finish(len(outputs))
    return events


def expected_pieces(model, outputs) -> list[str]:
    return [e.text for e in expected_events(model, outputs) if isinstance(e, Text)]


def expected_words(model, outputs, audio_seconds: float | None = None):
    return pair_words(e for e in expected_events(model, outputs, audio_seconds) if isinstance(e, (Word, WordEnd)))


def words_of(events) -> list[tuple[str, float, float]]:
    """(text, start, end) of the words in a stream's events, rounded to 0.1 ms."""
    return [(w.text, round(w.start, 4), round(w.end, 4))
            for w in pair_words(e for e in events if isinstance(e, (Word, WordEnd)))]


def ref_words(reference, pcm) -> list[tuple[str, float, float]]:
    """(text, start, end) of the words the single-stream reference gives for ``pcm``."""
    return [(w.text, round(w.start, 4), round(w.end, 4))
            for w in expected_words(reference.model, reference.outputs(pcm))]


def opus_pages_and_decoded(pcm: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """Ogg/Opus pages as a browser client sends them, and the PCM any decoder (the server's too) gets back."""
    pages = encode_ogg_opus(pcm)
    decoder = OggOpusDecoder()
    decoded = np.concatenate([decoder.feed(p) for p in pages])
    return pages, decoded


def regroup(data: bytes, rng: random.Random) -> list[bytes]:
    """Split a byte stream into messages of random sizes (pages cut and glued anywhere)."""
    out, position = [], 0
    while position < len(data):
        size = rng.choice([1, 7, 60, 300, 1000, 5000])
        out.append(data[position:position + size])
        position += size
    return out


async def seed_client(url: str, pages: list[bytes], rng: random.Random, start_delay: float = 0.0):
    """The Modal example's protocol: returns (text pieces, finished with 0x00, close code)."""
    await asyncio.sleep(start_delay)
    pieces, finished = [], False
    async with websockets.connect(url + "/ws", max_size=None) as ws:
        async def send():
            for message in regroup(b"".join(pages), rng):
                await ws.send(message)
                if rng.random() < 0.1:
                    await asyncio.sleep(rng.uniform(0, 0.3))
            await ws.send(b"")

        sender = asyncio.create_task(send())
        async for message in ws:
            assert isinstance(message, bytes)
            if message[:1] == b"\x01":
                pieces.append(message[1:].decode())
            elif message == b"\x00":
                finished = True
        await sender
        return pieces, finished, ws.close_code
