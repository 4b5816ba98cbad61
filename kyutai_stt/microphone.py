"""The default microphone as an async stream of 24 kHz mono float32 chunks (``transcribe --mic``)."""

from __future__ import annotations

import asyncio

import numpy as np

from .checkpoint import FRAME_SIZE, SAMPLE_RATE


class MicrophoneError(RuntimeError):
    """No usable microphone; the message says what is missing."""


class microphone:
    """Async iterator of 80 ms chunks from the default input device, until the consumer stops."""

    def __init__(self) -> None:
        try:
            import sounddevice
        except OSError as exc:  # sounddevice imports, but PortAudio is missing
            raise MicrophoneError(
                f"no audio system: {exc}. Install PortAudio (Debian/Ubuntu: apt install libportaudio2; "
                "macOS: brew install portaudio) to use --mic."
            ) from None
        try:
            device = sounddevice.query_devices(kind="input")
        except Exception as exc:
            raise MicrophoneError(f"no microphone found ({exc}); transcribe a file instead") from None
        if not device or device.get("max_input_channels", 0) < 1:
            raise MicrophoneError("no microphone found; transcribe a file instead")
        self._sd = sounddevice
        self.name = device.get("name", "default")

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[np.ndarray] = asyncio.Queue()

        def callback(indata, frames, time, status) -> None:  # PortAudio thread
            loop.call_soon_threadsafe(queue.put_nowait, indata[:, 0].copy())

        with self._sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=FRAME_SIZE,
                                  callback=callback):
            while True:
                yield await queue.get()
