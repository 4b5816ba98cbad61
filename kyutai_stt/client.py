"""Python client for a running kyutai-stt server (``WS /v1/stream``, JSON events).

    async for event in stream_events("ws://127.0.0.1:8000", pcm_24k):
        if isinstance(event, Word): print(event.start_time, event.text)
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import numpy as np
import websockets
from pydantic import TypeAdapter

from .checkpoint import FRAME_SIZE, SAMPLE_RATE
from .events import End, Error, Event

_events = TypeAdapter(Event)


def parse_event(data: str | bytes) -> Event:
    return _events.validate_json(data)


class ServerError(RuntimeError):
    """The server reported an error or closed the stream abnormally."""


def _ws_url(url: str, path: str) -> str:
    url = url.rstrip("/")
    if url.startswith("http://"):
        url = "ws://" + url[len("http://"):]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://"):]
    return url if url.endswith(path) else url + path


async def stream_events(
    url: str,
    pcm: np.ndarray,
    *,
    realtime: bool = False,
    chunk_samples: int = FRAME_SIZE,
    steps: bool = False,
    api_key: str | None = None,
) -> AsyncIterator[Event]:
    """Send 24 kHz mono float PCM to the server's JSON-events endpoint and yield events until ``End``."""
    query = "?format=pcm_f32le&sample_rate=24000" + ("&steps=true" if steps else "")
    headers = {"kyutai-api-key": api_key} if api_key else None
    async with websockets.connect(_ws_url(url, "/v1/stream") + query, additional_headers=headers,
                                  max_size=None) as ws:
        async def sender() -> None:
            start = asyncio.get_running_loop().time()
            for offset in range(0, len(pcm), chunk_samples):
                chunk = np.asarray(pcm[offset:offset + chunk_samples], "<f4")
                await ws.send(chunk.tobytes())
                if realtime:
                    due = start + (offset + len(chunk)) / SAMPLE_RATE
                    await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
            await ws.send(json.dumps({"type": "end"}))

        task = asyncio.create_task(sender())
        try:
            async for message in ws:
                event = parse_event(message)
                yield event
                if isinstance(event, Error):
                    raise ServerError(event.message)
                if isinstance(event, End):
                    return
            raise ServerError(f"connection closed before the end of the stream ({ws.close_code} {ws.close_reason})")
        finally:
            task.cancel()
