"""Transcribe audio files, in-process (one engine, the files share its batch) or against a server."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

import numpy as np

from .checkpoint import FRAME_SIZE, SAMPLE_RATE
from .engine import Engine
from .events import Event
from .session import Session


async def session_events(engine: Engine, pcm: np.ndarray, *, realtime: bool = False,
                         chunk_samples: int = FRAME_SIZE, end_of_turn_threshold: float = 0.5) -> AsyncIterator[Event]:
    """Stream ``pcm`` (24 kHz mono) through a new engine session and yield its events until ``End``/``Error``."""
    session = Session(engine, end_of_turn_threshold=end_of_turn_threshold)
    session.start()

    async def feed() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for offset in range(0, len(pcm), chunk_samples):
            session.push_pcm(pcm[offset:offset + chunk_samples])
            if realtime:
                await asyncio.sleep(max(0.0, start + (offset + chunk_samples) / SAMPLE_RATE - loop.time()))
            elif offset % (chunk_samples * 64) == 0:
                await asyncio.sleep(0)
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
