"""Helpers for the hardening tests: raw exchanges with a WebSocket endpoint, a well-behaved neighbour stream whose
words must stay equal to the reference while bad clients come and go, and waiting for the server to be idle."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import websockets

from kyutai_stt.audio.constants import FRAME_SIZE
from kyutai_stt.client import Client
from kyutai_stt.messages.events import Text

from .helpers import expected_pieces, expected_words, opus_pages_and_decoded, ref_words, words_of  # noqa: F401


class Closed:
    """What a client saw: the messages received and how the server closed (code None: no close frame)."""

    def __init__(self, received: list, code: int | None, reason: str):
        self.received, self.code, self.reason = received, code, reason

    def __repr__(self) -> str:
        return f"Closed({self.code}, {self.reason!r}, last={self.received[-2:]!r})"


async def exchange(url: str, messages, *, timeout: float = 60.0, headers=None) -> Closed:
    """Send ``messages`` (stopping early if the server closes), then read until the server closes the socket."""
    received: list = []
    async with websockets.connect(url, max_size=None, additional_headers=headers, open_timeout=30) as ws:
        try:
            for message in messages:
                await ws.send(message)
        except websockets.ConnectionClosed:
            pass
        try:
            async with asyncio.timeout(timeout):
                async for message in ws:
                    received.append(message)
        except websockets.ConnectionClosed:
            pass
        except TimeoutError:
            raise AssertionError(f"{url}: the server did not close within {timeout} s "
                                 f"(got {received[-3:]!r})") from None
    return Closed(received, ws.close_code, ws.close_reason or "")


async def gather(*coroutines, limit: int = 6) -> list:
    """``asyncio.gather`` with at most ``limit`` running at once (the test servers have 8 slots)."""
    semaphore = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with semaphore:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))


async def wait_idle(server, timeout: float = 30.0) -> dict:
    """Wait until no slot is in use; the server must stay healthy throughout. Returns the last /status."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            status = (await client.get(server.http + "/status")).json()
            assert status["healthy"], status
            if status["slots_in_use"] == 0:
                return status
            if loop.time() > deadline:
                raise AssertionError(f"slots still in use after {timeout} s: {status}")
            await asyncio.sleep(0.05)


class Neighbour:
    """A well-behaved stream that runs while the body of ``async with`` misbehaves; on exit it finishes its audio
    and its result must equal the single-stream reference exactly (words and timestamps over the events
    protocol, text pieces over the seed protocol).

    It sends all its audio but the last frame at once, then holds the last frame until the body is done, so
    it is live (a slot taken, frames in the engine) for the whole body."""

    def __init__(self, server, reference, pcm: np.ndarray, protocol: str = "events"):
        self.server, self.reference, self.pcm, self.protocol = server, reference, pcm, protocol

    async def __aenter__(self):
        self.release, self.started = asyncio.Event(), asyncio.Event()
        self.task = asyncio.create_task(self._run())
        started = asyncio.create_task(self.started.wait())
        await asyncio.wait({self.task, started}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self.task.done():
            self.task.result()  # raises what went wrong
        assert self.started.is_set(), "the neighbour stream did not start"
        return self

    async def _audio(self):
        chunks = [self.pcm[i:i + FRAME_SIZE] for i in range(0, len(self.pcm), FRAME_SIZE)]
        for chunk in chunks[:-1]:
            yield chunk
            self.started.set()
            await asyncio.sleep(0.005)
        await self.release.wait()
        yield chunks[-1]

    async def _run(self) -> list:
        return [event async for event in Client(self.server.ws, self.protocol).stream(self._audio())]

    async def __aexit__(self, kind, exc, tb):
        self.release.set()
        events = await asyncio.wait_for(self.task, 180)
        if kind is not None:
            return
        if self.protocol == "seed":
            decoded = opus_pages_and_decoded(self.pcm)[1]
            got = [e.text for e in events if isinstance(e, Text)]
            want = expected_pieces(self.reference.model, self.reference.outputs(decoded))
        else:
            got, want = words_of(events), ref_words(self.reference, self.pcm)
        assert want, "pick a clip the model transcribes to something"
        assert got == want, "the neighbour stream's transcript changed"
