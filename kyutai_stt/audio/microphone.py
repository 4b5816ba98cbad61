"""The default microphone as an async stream of 24 kHz mono float32 chunks (``transcribe --mic``)."""

from __future__ import annotations

import asyncio

import numpy as np

from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE


class MicrophoneError(RuntimeError):
    """No usable microphone; the message says what is missing."""


class microphone:
    """Async iterator of 80 ms chunks from the default input device, until ``stop()`` (or the consumer stops)."""

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
        self._queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue()

    def stop(self) -> None:
        """End the stream after the audio already captured (call it on the event loop, e.g. on Ctrl+C)."""
        self._queue.put_nowait(None)

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        queue = self._queue

        def callback(indata, frames, time, status) -> None:  # PortAudio thread
            loop.call_soon_threadsafe(queue.put_nowait, indata[:, 0].copy())

        with self._sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=FRAME_SIZE,
                                  callback=callback):
            while (chunk := await queue.get()) is not None:
                yield chunk
        await asyncio.sleep(0)  # run the hand-overs PortAudio scheduled before the stream closed
        while not queue.empty():  # and yield what they carried
            if (chunk := queue.get_nowait()) is not None:
                yield chunk
