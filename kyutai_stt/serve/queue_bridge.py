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
with an ``.aio`` variant (``modal.Queue``), as coroutines, or plain blocking calls (run in a thread): see
``messages.queue``, which the client's half shares. The stream runs on the one runner (``protocols.runner``):
this module is the Queue's translator and transport.
"""

from __future__ import annotations

import asyncio
import logging
import queue as std_queue
from typing import Any

from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.audio.decoders import OPUS_OR_FILE, stream_decoder
from kyutai_stt.audio.errors import AudioFormatError
from kyutai_stt.messages.events import Error, Event, Step, Text
from kyutai_stt.messages.queue import AUDIO, TRANSCRIPTION, queue_call
from kyutai_stt.serve.protocols import runner
from kyutai_stt.serve.protocols.errors import CloseSocket, ServerFault
from kyutai_stt.stream.session import Session
from kyutai_stt.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["AUDIO", "TRANSCRIPTION", "ClientGone", "QueueTranslator", "queue_call", "transcribe_queue"]


class ClientGone(RuntimeError):
    """The client stopped sending audio, or stopped reading the transcription, for longer than the idle timeout."""

    def __init__(self, message: str, reading: bool):
        super().__init__(message)
        self.reading = reading  # it may still read the transcription (it only stopped sending)


class QueueTranslator(runner.Translator):
    """Queue items in (``bytes`` of audio, ``None`` at the end), text pieces or event dicts out."""

    protocol = "queue"

    def __init__(self, max_bytes: int, events: bool):
        super().__init__(stream_decoder(OPUS_OR_FILE, max_bytes=max_bytes))
        self.events = events
        self.pieces: list[str] = []  # the transcript, returned at the end
        self.errors: list[str] = []

    def parse(self, chunk: Any) -> list[runner.Input]:
        if chunk is None:
            return [runner.End()]
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise AudioFormatError("audio chunks must be bytes (Ogg/Opus pages or pieces of an audio file), not "
                                   f"{type(chunk).__name__}")
        return [runner.Audio(bytes(chunk))]

    def render(self, event: Event) -> list[Any]:
        out: list[Any] = []
        if isinstance(event, Text):
            self.pieces.append(event.text)
            if not self.events:
                out.append(event.text)
        elif isinstance(event, Error):
            self.errors.append(event.message)
        if self.events and not isinstance(event, Step):
            out.append(event.model_dump())
        return out


def _no_flush(marker: int) -> float:
    raise ValueError("the Queue protocol has no mid-stream flush")


async def transcribe_queue(engine, q, settings: Settings | None = None, *, events: bool = False,
                           idle_timeout: float | None = None, audio_partition: str = AUDIO,
                           text_partition: str = TRANSCRIPTION) -> str:
    """Serve one stream over ``q`` (see the module docstring) on ``engine``; returns the whole transcript.

    Bad input (``AudioFormatError``, ``SessionLimitError``), a full or stopped engine (``NoFreeSlot``,
    ``EngineStopped``) and a failed stream (``RuntimeError``) raise, always after putting ``None`` (and, with
    ``events``, an ``error`` event) so the client stops waiting. A client gone silent is not an error: the call
    frees its slot and returns the transcript so far.
    """
    settings = settings or Settings()
    timeout = settings.idle_timeout_s if idle_timeout is None else idle_timeout
    session = Session.from_settings(engine, settings, record_dir=None, max_pending_events=0)
    translator = QueueTranslator(settings.max_upload_bytes, events)

    async def put(item: Any) -> None:
        try:
            await queue_call(q.put, item, timeout=timeout, partition=text_partition)
        except std_queue.Full:
            raise ClientGone(f"nobody read the transcription for {timeout:g} s", reading=False) from None

    async def send(items) -> None:
        for item in items:
            await put(item)

    async def receive() -> Any:
        await session.wait_for_room()  # a client far ahead of the engine waits in the Queue, not in memory
        try:
            return await queue_call(q.get, timeout=timeout, partition=audio_partition)
        except std_queue.Empty:
            raise ClientGone(f"no audio for {timeout:g} s", reading=True) from None

    try:
        session.start()
    except Exception as exc:  # NoFreeSlot, EngineStopped
        if events:
            await put(Error(message=str(exc)).model_dump())
        await put(None)
        raise

    receiver = asyncio.create_task(runner.feed_inputs(receive, send, session, translator, _no_flush))
    sender = asyncio.create_task(runner.forward_events(send, session, translator))
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
            if isinstance(failure, CloseSocket) and failure.__cause__ is not None:
                failure = failure.__cause__  # the runner's close for bad input: the caller gets the error itself
            session.fail(str(failure))  # the sender forwards the error event, then ends
            await asyncio.wait_for(asyncio.shield(sender), timeout=timeout + 1)
        else:  # the sender ended first: the engine failed the stream, or the client stopped reading
            sender.result()
        if translator.errors and failure is None:
            failure = RuntimeError(translator.errors[0])
    except ServerFault as exc:  # the engine failed the stream (or the stream failed after bad input: see above)
        failure = failure or RuntimeError(translator.errors[0] if translator.errors else exc.reason)
    except (ClientGone, RuntimeError, asyncio.TimeoutError) as exc:
        failure = failure or exc
    finally:
        for task in (receiver, sender):
            task.cancel()
        await asyncio.gather(receiver, sender, return_exceptions=True)
        session.abort()  # nothing to do once the stream has ended; frees the slot otherwise
        translator.decoder.close()

    transcript = "".join(translator.pieces).strip()
    if isinstance(failure, ClientGone):
        log.warning("queue stream %s ended early: %s", session.id, failure)
        if failure.reading:  # it may still be reading: tell it the stream is over
            await put(None)
        return transcript
    await put(None)
    if failure is not None:
        raise failure
    return transcript
