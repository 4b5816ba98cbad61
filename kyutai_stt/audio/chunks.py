"""Audio as an async iterator of 80 ms chunks, for clients and the in-process API. numpy only: no codec, no torch."""

from __future__ import annotations

import asyncio

import numpy as np

from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE


class audio_chunks:
    """Audio as an async iterator of float32 chunks: slices of an array (paced at real time if asked), or the
    chunks of an async iterable as they come. Counts the samples it yielded (of every channel: ``channels`` for
    interleaved audio, so that real-time pacing counts time, not samples)."""

    def __init__(self, audio, chunk_samples: int = FRAME_SIZE, realtime: bool = False, channels: int = 1):
        self.audio, self.chunk_samples, self.realtime = audio, chunk_samples, realtime
        self.channels = channels
        self.samples = 0

    async def __aiter__(self):
        if isinstance(self.audio, np.ndarray):
            pcm = np.asarray(self.audio, np.float32).reshape(-1)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for offset in range(0, len(pcm), self.chunk_samples):
                chunk = pcm[offset:offset + self.chunk_samples]
                self.samples += len(chunk)
                yield chunk
                if self.realtime:
                    await asyncio.sleep(max(0.0, start + self.samples / self.channels / SAMPLE_RATE - loop.time()))
        else:
            async for chunk in self.audio:
                chunk = np.asarray(chunk, np.float32).reshape(-1)
                self.samples += len(chunk)
                yield chunk
