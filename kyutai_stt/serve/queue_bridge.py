"""One stream over a queue with two partitions, as the Modal app's ``transcribe_queue`` serves it.

The client puts audio chunks (``bytes``) in partition ``"audio"`` and ``None`` when the audio ends; the service
puts the transcription in partition ``"transcription"`` and ``None`` once every word has been sent. Chunks are
either Ogg/Opus pages in any grouping (decoded as they come, so words come while the audio streams) or pieces of
any other encoded file (wav, mp3, flac, ogg/vorbis: gathered and decoded when the audio ends). Either way the
audio is resampled to 24 kHz. Each call takes one engine slot, which starts fresh, and gives it back however the
call ends; a client that sends nothing for ``idle_timeout`` seconds is taken to be gone.

What goes into ``"transcription"``: with ``events=False`` the text pieces as the model emits them (``str``; a piece
starting with a space starts a word), as Modal's example does; with ``events=True`` every event of
``kyutai_stt.messages.events`` except the 80 ms ``step`` events, as plain dicts (``{"type": "word", "text": ...,
"start_time": ...}``), so a client needs nothing of this package to read them.

The queue only needs ``get(timeout=..., partition=...)`` and ``put(item, timeout=..., partition=...)``, either
with an ``.aio`` variant (``modal.Queue``), as coroutines, or plain blocking calls (run in a thread).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue as std_queue
from typing import Any

import numpy as np

from kyutai_stt.audio.decode import AudioFormatError, OggOpusDecoder, load_audio_bytes
from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.engine.contract import Engine
from kyutai_stt.messages.events import Error, Ready, Step, Text
from kyutai_stt.stream.session import Session, SessionLimitError
from kyutai_stt.settings import Settings

log = logging.getLogger(__name__)

AUDIO = "audio"
TRANSCRIPTION = "transcription"

_OPUS_HEAD_AT = 28  # "OggS" page header (27 bytes) + a one-entry segment table, then "OpusHead"


class ClientGone(RuntimeError):
    """The client stopped sending audio, or stopped reading the transcription, for longer than the idle timeout."""

    def __init__(self, message: str, reading: bool):
        super().__init__(message)
        self.reading = reading  # it may still read the transcription (it only stopped sending)


async def queue_call(method, *args, **kwargs) -> Any:
    """Call a modal.Queue method (its ``.aio`` variant when it has one), a coroutine function, or a blocking
    function (on a thread)."""
    aio = getattr(method, "aio", None)
    if aio is not None:
        return await aio(*args, **kwargs)
    if inspect.iscoroutinefunction(method):
        return await method(*args, **kwargs)
    return await asyncio.to_thread(method, *args, **kwargs)


class ChunkDecoder:
    """Audio chunks in, 24 kHz mono float32 out: Ogg/Opus incrementally, any other file format at the end."""

    def __init__(self, max_buffered_bytes: int):
        self.max_buffered_bytes = max_buffered_bytes
        self.kind: str | None = None  # "opus" or "file", known after the first bytes
        self._head = b""
        self._opus: OggOpusDecoder | None = None
        self._file = bytearray()

    def feed(self, data: bytes) -> np.ndarray:
        if self.kind is None:
            self._head += data
            if b"OggS".startswith(self._head[:4]) and len(self._head) < _OPUS_HEAD_AT + 8:
                return np.zeros(0, np.float32)  # too early to tell an Ogg/Opus stream from an Ogg/Vorbis file
            self.kind = "opus" if self._head[_OPUS_HEAD_AT:_OPUS_HEAD_AT + 8] == b"OpusHead" else "file"
            data, self._head = self._head, b""
            if self.kind == "opus":
                self._opus = OggOpusDecoder()
        if self.kind == "opus":
            assert self._opus is not None
            return self._opus.feed(data)
        self._file += data
        if len(self._file) > self.max_buffered_bytes:
            raise AudioFormatError(f"encoded audio larger than {self.max_buffered_bytes} bytes: stream Ogg/Opus instead")
        return np.zeros(0, np.float32)

    async def finish(self) -> np.ndarray:
        """The audio has ended: decode the gathered file (in a thread: long files take a while)."""
        if self.kind is None and self._head:
            self.kind, self._file = "file", bytearray(self._head)
        if self.kind != "file" or not self._file:
            return np.zeros(0, np.float32)
        data, self._file = bytes(self._file), bytearray()
        return await asyncio.to_thread(load_audio_bytes, data)


def _as_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    raise AudioFormatError(f"audio chunks must be bytes (Ogg/Opus pages or pieces of an audio file), not {type(chunk).__name__}")


async def transcribe_queue(engine: Engine, q, settings: Settings | None = None, *, events: bool = False,
                           idle_timeout: float | None = None, audio_partition: str = AUDIO,
                           text_partition: str = TRANSCRIPTION) -> str:
    """Serve one stream over ``q`` (see the module docstring); returns the whole transcript.

    Bad input (``AudioFormatError``, ``SessionLimitError``), a full or stopped engine (``NoFreeSlot``,
    ``EngineStopped``) and a failed stream (``RuntimeError``) raise, always after putting ``None`` (and, with
    ``events``, an ``error`` event) so the client stops waiting. A client gone silent is not an error: the call
    frees its slot and returns the transcript so far.
    """
    settings = settings or Settings()
    timeout = settings.idle_timeout_s if idle_timeout is None else idle_timeout
    session = Session.from_settings(engine, settings, record_dir=None, max_pending_events=0)
    decoder = ChunkDecoder(settings.max_upload_bytes)
    pieces: list[str] = []
    errors: list[str] = []

    async def put(item: Any) -> None:
        try:
            await queue_call(q.put, item, timeout=timeout, partition=text_partition)
        except std_queue.Full:
            raise ClientGone(f"nobody read the transcription for {timeout:g} s", reading=False) from None

    async def receive() -> None:
        while True:
            await session.wait_for_room()  # a client far ahead of the engine waits in the Queue, not in memory
            try:
                chunk = await queue_call(q.get, timeout=timeout, partition=audio_partition)
            except std_queue.Empty:
                raise ClientGone(f"no audio for {timeout:g} s", reading=True) from None
            if chunk is None:
                break
            session.push_pcm(decoder.feed(_as_bytes(chunk)))
        session.push_pcm(await decoder.finish())
        session.end()

    async def send() -> None:
        async for event in session:
            if isinstance(event, Text):
                pieces.append(event.text)
                if not events:
                    await put(event.text)
            elif isinstance(event, Error):
                errors.append(event.message)
            if events and not isinstance(event, Step):
                await put(event.model_dump())

    try:
        session.start()
    except Exception as exc:  # NoFreeSlot, EngineStopped
        if events:
            await put(Error(message=str(exc)).model_dump())
        await put(None)
        raise

    receiver = asyncio.create_task(receive())
    sender = asyncio.create_task(send())
    failure: BaseException | None = None
    try:
        done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        if receiver in done and receiver.exception() is None:
            # All audio is in: the last words come during the flush, at the engine's pace. The bound only
            # guards against a stalled engine; the engine ends or fails every stream it holds.
            pending = session.buffered_samples / SAMPLE_RATE + engine.info.flush_frames / engine.info.frame_rate
            try:
                await asyncio.wait_for(asyncio.shield(sender), timeout=timeout + 60 + 4 * pending)
            except asyncio.TimeoutError:
                raise RuntimeError("the transcription did not finish in time") from None
        elif receiver in done:  # bad audio, too long, or the client went silent
            failure = receiver.exception()
            session.fail(str(failure))  # the sender forwards the error event, then ends
            await asyncio.wait_for(asyncio.shield(sender), timeout=timeout + 1)
        else:  # the sender ended first: the engine failed the stream, or the client stopped reading
            sender.result()
        if errors and failure is None:
            failure = RuntimeError(errors[0])
    except (ClientGone, RuntimeError, asyncio.TimeoutError) as exc:
        failure = failure or exc
    finally:
        for task in (receiver, sender):
            task.cancel()
        await asyncio.gather(receiver, sender, return_exceptions=True)
        session.abort()  # nothing to do once the stream has ended; frees the slot otherwise

    if isinstance(failure, ClientGone):
        log.warning("queue stream %s ended early: %s", session.id, failure)
        if failure.reading:  # it may still be reading: tell it the stream is over
            await put(None)
        return "".join(pieces).strip()
    await put(None)
    if failure is not None:
        raise failure
    return "".join(pieces).strip()
