"""Transcribe audio files, in-process (one engine from ``engine.startup.start_engine``, the files share its batch)
or against a server."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

import numpy as np

from kyutai_stt.audio.chunks import audio_chunks
from kyutai_stt.audio.constants import FRAME_SIZE
from kyutai_stt.engine.contract import Engine
from kyutai_stt.messages.events import Event
from kyutai_stt.stream.session import Session
from kyutai_stt.stream.speakers import DiarizedSession


async def start_session(engine: Engine, *, wait_seconds: float = 0.0, diarizer=None, **session_kwargs) -> Session:
    """A started session (with ``diarizer``: its words carry speakers); when every slot is busy, wait up to
    ``wait_seconds`` for one (then NoFreeSlot)."""
    session = DiarizedSession(engine, diarizer, **session_kwargs) if diarizer is not None \
        else Session(engine, **session_kwargs)
    await session.start_waiting(wait_seconds)
    return session


async def session_events(engine: Engine, audio, *, realtime: bool = False,
                         chunk_samples: int = FRAME_SIZE, end_of_turn_threshold: float = 0.5,
                         wait_seconds: float = 0.0, diarizer=None, decoding=None) -> AsyncIterator[Event]:
    """Stream ``audio`` (24 kHz mono: an array, or an async iterable of chunks) through a new engine session and
    yield its events until ``End``/``Error`` (words with speakers when a ``diarizer`` is given). ``decoding``: the
    stream's ``DecodingOptions`` (default greedy)."""
    session = await start_session(engine, wait_seconds=wait_seconds, end_of_turn_threshold=end_of_turn_threshold,
                                  diarizer=diarizer, decoding=decoding)

    async def feed() -> None:
        count = 0
        async for chunk in audio_chunks(audio, chunk_samples, realtime):
            session.push_pcm(chunk)
            count += 1
            if count % 64 == 0:
                await asyncio.sleep(0)  # let the events flow while a long file is pushed
        session.end()

    feeder = asyncio.create_task(feed())
    try:
        async for event in session:
            yield event
    finally:
        feeder.cancel()
        if not session.finished:
            session.abort()


EventSource = Callable[[np.ndarray], AsyncIterator[Event]]


async def run_many(sources: list[tuple[np.ndarray, EventSource]],
                   on_event: Callable[[int, Event], None]) -> None:
    """Run several streams concurrently, calling ``on_event(index, event)`` as events arrive."""
    async def one(index: int, pcm: np.ndarray, source: EventSource) -> None:
        async for event in source(pcm):
            on_event(index, event)

    await asyncio.gather(*(one(i, pcm, source) for i, (pcm, source) in enumerate(sources)))
