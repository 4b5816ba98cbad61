"""One stream, seen from asyncio: audio in, typed events out. Every protocol adapter is a thin layer over this.

    session = Session(engine, settings)
    session.start()                 # takes a slot (NoFreeSlot when full); emits Ready
    session.push_pcm(pcm_24k)       # any length, any time
    session.push_marker(7)          # echoed once all audio before it is transcribed
    session.push_marker(8, finalize=True)  # same, and the word in progress is closed first (flush.flush_now)
    session.end()                   # no more audio: the engine flushes, the last words come, then End
    async for event in session: ... # Ready, Text, Word, WordEnd, Step, EndOfTurn, Marker, End | Error

The engine calls back on its worker thread; the session hops to the event loop and turns the raw token stream
into events (``reader.OutputReader``: words, end of turn from the VAD head the model names), plus markers.

Pace: the engine holds at most ``max_buffered_seconds`` of a stream's audio; what a client sends beyond that
waits in the session's ``AudioSpool`` (memory up to ``spool_memory_seconds``, then a temporary file) and is fed to
the engine as it drains. So an adapter can always read its socket: a client far ahead of the engine (a file
sent at full speed, or a real-time client while the engine is slower than real time) keeps its keepalive pongs
flowing and gets every word, at the engine's pace, with bounded memory. Markers and the end of the stream count
spooled audio, so they stay in order with it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np

from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE
from kyutai_stt.engine.contract import (ContextReset, DecodingOptions, Engine, EngineEvent, StepOutput,
    StreamClosed, StreamEnd, StreamFailed, StreamHandle)
from kyutai_stt.engine.slots import open_when_free
from kyutai_stt.messages.events import End, Error, Event, Marker, Ready, Reset
from kyutai_stt.stream.reader import OutputReader
from kyutai_stt.stream.watchdog import StallWatchdog

log = logging.getLogger(__name__)


class SessionLimitError(ValueError):
    """The client went past a configured bound (session length)."""


class AudioSpool:
    """A FIFO of float32 samples held in memory up to ``memory_bytes``, then in a temporary file (deleted when
    closed). Put and take any lengths; the file is reset whenever the spool runs empty."""

    def __init__(self, memory_bytes: int):
        self._file = tempfile.SpooledTemporaryFile(max_size=memory_bytes)
        self._read = 0  # byte offsets in the file
        self._write = 0

    def __len__(self) -> int:
        """Samples waiting."""
        return (self._write - self._read) // 4

    def put(self, pcm: np.ndarray) -> None:
        data = np.ascontiguousarray(pcm, np.float32).tobytes()
        self._file.seek(self._write)
        self._file.write(data)
        self._write += len(data)

    def take(self, samples: int) -> np.ndarray:
        """Up to ``samples`` samples from the front."""
        self._file.seek(self._read)
        data = self._file.read(min(samples, len(self)) * 4)
        self._read += len(data)
        if self._read == self._write:  # empty: start again at the beginning of the file
            self._file.seek(0)
            self._file.truncate()
            self._read = self._write = 0
        return np.frombuffer(data, np.float32)

    def close(self) -> None:
        self._file.close()
        self._read = self._write = 0


class Session:
    def __init__(self, engine: Engine, *, end_of_turn_threshold: float = 0.5, max_seconds: float = math.inf,
                 record_dir: str | None = None, session_id: str | None = None, max_pending_events: int = 0,
                 max_buffered_seconds: float = math.inf, spool_memory_seconds: float = 30.0,
                 decoding: DecodingOptions | None = None, stall_seconds: float = 0.0, on_reset=None,
                 on_finalized=None):
        """``decoding``: sampling and keyterms (default greedy); ``stall_seconds`` > 0 runs the stall watchdog
        (``watchdog``); ``on_reset(reason)`` is told of every context reset, ``on_finalized(seconds)`` of the time
        from each finalizing marker to its echo, the final words out (metrics)."""
        self.engine = engine
        self.decoding = decoding
        self.seed: int | None = None  # the sampling seed in use, once started
        self._watchdog = StallWatchdog(engine.info, stall_seconds) if stall_seconds > 0 else None
        self._on_reset = on_reset
        self._on_finalized = on_finalized
        self._reset_reasons: deque[str] = deque()  # asked for, not yet done by the engine
        self.id = session_id or uuid.uuid4().hex[:12]
        self.samples_received = 0
        self._max_samples = max_seconds * SAMPLE_RATE
        self._record_dir = record_dir
        self._recording = None  # soundfile.SoundFile, opened by the first audio (record_dir only)
        self._reader = OutputReader(engine.info, end_of_turn_threshold)
        self._lead_frames = engine.info.lead_frames
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._handle: StreamHandle | None = None
        # (frames needed, marker id, finalize, monotonic time it came)
        self._markers: deque[tuple[int, int, bool, float]] = deque()
        self._max_pending = max_pending_events  # 0: unbounded (in-process consumers)
        self._max_buffered = max_buffered_seconds * SAMPLE_RATE
        self._spool = AudioSpool(int(spool_memory_seconds * SAMPLE_RATE) * 4)
        self._close_pending = False  # end() came while audio was still spooled
        self._close_flush = True  # end()'s flush, for that deferred close
        self._progress = asyncio.Event()  # set whenever the engine reports on this stream
        self.dropped = asyncio.Event()  # set when the consumer fell too far behind: the stream was aborted
        self.ended = False  # end() was called
        self.finished = False  # End or Error was emitted

    @classmethod
    def from_settings(cls, engine: Engine, settings, **overrides) -> "Session":
        """A live stream's session bounded by a ``Settings`` object (the one place they map onto a Session)."""
        options = dict(end_of_turn_threshold=settings.end_of_turn_threshold, max_seconds=settings.max_session_s,
                       record_dir=settings.record_dir, max_pending_events=settings.max_pending_events,
                       max_buffered_seconds=settings.max_buffered_audio_s,
                       spool_memory_seconds=settings.spool_memory_s, stall_seconds=settings.stall_seconds)
        return cls(engine, **{**options, **overrides})

    # ------------------------------------------------------------ input (event-loop thread)
    def start(self) -> None:
        self._started(self.engine.open(self._sink, options=self.decoding))

    async def start_waiting(self, timeout: float) -> None:
        """``start()``, but when every slot is busy wait up to ``timeout`` s for one (then ``NoFreeSlot``)."""
        self._started(await open_when_free(self.engine, self._sink, timeout, self.decoding))

    def _started(self, handle: StreamHandle) -> None:
        self._handle = handle
        self.seed = handle.seed
        self._emit(Ready(seed=handle.seed))

    def reset_context(self, reason: str = "client") -> None:
        """Reset the model's context at the stream's next step (a stall); a ``Reset`` event says where."""
        if self._handle is None or self.finished:
            return
        self._reset_reasons.append(reason)
        self.engine.reset(self._handle)
        if self._watchdog is not None:
            self._watchdog.reset()
        if self._on_reset is not None:
            self._on_reset(reason)

    def reconfigure(self, options: DecodingOptions) -> None:
        """Decode with ``options`` from the end of the audio received so far (a frame boundary: the frame after
        the last one begun), so the words depend on the audio and on where in it this came, never on timing.
        Before any audio (and with a model without a silence prefix): as if the stream had been opened with them.
        ``ValueError`` when out of range."""
        options = options.check()
        if not hasattr(self.engine, "reconfigure"):
            raise ValueError("the served model takes no decoding options")
        if self._handle is None or self.finished or self.ended:
            return
        self.decoding = options
        # frames the engine may step before this point: the silence prefix and every frame begun; with no prefix
        # and no audio that is 0, which the engine takes as "from the start"
        frame = self.engine.info.prefix_frames + math.ceil(self.samples_received / FRAME_SIZE)
        self.engine.reconfigure(self._handle, options, frame)

    def push_pcm(self, pcm: np.ndarray) -> None:
        if self.ended or self.finished or self._handle is None:
            return
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        if self.samples_received + pcm.size > self._max_samples:
            raise SessionLimitError(f"stream longer than the {self._max_samples / SAMPLE_RATE:.0f} s limit")
        self.samples_received += pcm.size
        if self._watchdog is not None:
            self._watchdog.feed_audio(pcm)
        if self._record_dir:
            self._record(pcm)
        if not pcm.size:
            return
        if not len(self._spool) and self.engine.buffered_samples(self._handle) + pcm.size <= self._max_buffered:
            self._push_to_engine(pcm)
        else:
            self._spool.put(pcm)
            self._drain()

    def _push_to_engine(self, pcm: np.ndarray) -> None:
        try:
            self.engine.push(self._handle, pcm)
        except StreamClosed:
            pass  # the engine dropped the stream (a failed step): its StreamFailed event is on its way

    def _drain(self) -> None:
        """Move spooled audio to the engine while it holds less than ``max_buffered_seconds``; close the stream
        in the engine once the spool is empty after ``end``."""
        if self.finished or self._handle is None:
            return
        while len(self._spool):
            room = min(self._max_buffered - self.engine.buffered_samples(self._handle), len(self._spool))
            if room < min(FRAME_SIZE, len(self._spool)):
                break
            self._push_to_engine(self._spool.take(int(room)))
        if self._close_pending and not len(self._spool):
            self._close_pending = False
            self.engine.close(self._handle, self._close_flush)

    def push_marker(self, marker_id: int, finalize: bool = False, frames: int | None = None) -> int:
        """Echo ``Marker(marker_id)`` once every frame of the audio so far has been transcribed (the model's delay
        included), or the first ``frames`` frames (not past those of the audio so far). ``finalize``: the word in
        progress is then complete and closed at that point (``Word`` and ``WordEnd`` before the ``Marker``), as at
        the end of a stream; ``flush.flush_now`` places such a marker at the end of its flush. Returns the frames
        it waits for."""
        due = math.ceil(self.samples_received / FRAME_SIZE) + self._lead_frames
        frames = due if frames is None else min(frames, due)
        self._markers.append((frames, marker_id, finalize, time.monotonic()))
        if finalize and self._handle is not None and not self.finished:
            self.engine.expedite(self._handle, frames)  # its client waits for these words: step them first
        self._echo_markers()
        return frames

    def end(self, flush: bool = True) -> None:
        """No more audio: the stream ends once its words are out (``flush``: as ``Engine.close``'s)."""
        if self.ended or self._handle is None:
            return
        self.ended = True
        self._close_flush = flush
        self._reader.set_audio_end(self.samples_received / SAMPLE_RATE)  # the flush silence is not audio
        self._close_pending = True
        self._drain()

    def abort(self) -> None:
        """The client is gone: give the slot back now."""
        if self._handle is not None and not self.finished:
            self.engine.abort(self._handle)
        self.finished = True
        self._spool.close()
        self._save_recording()

    async def wait_for_room(self) -> None:
        """Return once nothing is spooled and the engine holds at most ``max_buffered_seconds`` of this stream.

        For sources that hold the client's audio themselves (the Modal Queue): reading no faster than the engine
        leaves it there. WebSocket adapters do not call it: they always read (keepalive pongs queue behind the
        audio in TCP) and let the spool hold what is ahead.
        """
        while not self.finished and self.buffered_samples > self._max_buffered:
            self._progress.clear()
            await self._progress.wait()

    @property
    def frames_done(self) -> int:
        """Frames of this stream the engine has processed so far."""
        return self._reader.frames_done

    @property
    def buffered_samples(self) -> int:
        """Samples received and not yet transcribed: in the engine and in the spool."""
        return (self.engine.buffered_samples(self._handle) if self._handle else 0) + len(self._spool)

    # ------------------------------------------------------------ output
    def __aiter__(self):
        return self._events()

    async def _events(self):
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, (End, Error)):
                return

    def fail(self, message: str) -> None:
        """Report an error to the consumer and drop the stream."""
        if not self.finished:
            self.abort()
            self._queue.put_nowait(Error(message=message))

    def _emit(self, event: Event) -> None:
        if self._max_pending and self._queue.qsize() >= self._max_pending:
            if not self.dropped.is_set():  # the consumer is stuck: give the slot back, never block the engine
                log.warning("session %s: client is not reading its results, dropping it", self.id, extra={"session_id": self.id})
                self.abort()
                self.dropped.set()
            return
        self._queue.put_nowait(event)

    def _sink(self, events: list[EngineEvent]) -> None:  # engine worker thread
        try:
            self._loop.call_soon_threadsafe(self._on_engine, events)
        except RuntimeError:  # event loop closed: nobody is listening any more
            pass

    def _on_engine(self, events: list[EngineEvent]) -> None:
        self._progress.set()
        if self.finished:
            return
        self._drain()
        for item in events:
            if isinstance(item, StepOutput):
                self._on_step(item)
            elif isinstance(item, ContextReset):
                reason = self._reset_reasons.popleft() if self._reset_reasons else "client"
                info = self.engine.info
                self._emit(Reset(time=max(0.0, (item.frame - info.prefix_frames) / info.frame_rate), reason=reason))
            elif isinstance(item, StreamEnd):
                for event in self._reader.end(item):
                    self._emit(event)
                for _, marker_id, _, _ in self._markers:
                    self._emit(Marker(id=marker_id))
                self._markers.clear()
                self.finished = True
                self._spool.close()
                self._emit(End(duration=self.samples_received / SAMPLE_RATE))
                self._save_recording()
            elif isinstance(item, StreamFailed):
                self.finished = True
                self._spool.close()
                self._emit(Error(message=item.reason))

    def _on_step(self, out: StepOutput) -> None:
        for event in self._reader.step(out, out.buffered_samples + len(self._spool)):
            self._emit(event)
        self._echo_markers()
        if self._watchdog is not None and self._watchdog.step(out):  # also after end(): a file is sent at once
            log.warning("session %s: no text for %.1f s of speech, resetting the model context", self.id,
                        self._watchdog.stall_seconds, extra={"session_id": self.id})
            self.reset_context("stall")

    def _echo_markers(self) -> None:
        while self._markers and self._reader.frames_done >= self._markers[0][0]:
            _, marker_id, finalize, since = self._markers.popleft()
            if finalize:
                for event in self._reader.finalize():
                    self._emit(event)
                if self._on_finalized is not None:
                    self._on_finalized(time.monotonic() - since)
            self._emit(Marker(id=marker_id))

    def _record(self, pcm: np.ndarray) -> None:
        """Debug: append the decoded audio to ``<record_dir>/<session id>.wav.part`` as it comes (hours of audio
        never sit in memory); it is renamed ``.wav`` once the session is over."""
        if self._recording is None:
            import soundfile

            path = Path(self._record_dir) / f"{self.id}.wav.part"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._recording = soundfile.SoundFile(str(path), "w", SAMPLE_RATE, 1, subtype="FLOAT", format="WAV")
        self._recording.write(pcm)

    def _save_recording(self) -> None:
        if self._recording is None:
            return
        recording, self._recording = self._recording, None
        recording.close()
        path = Path(recording.name)
        path = path.rename(path.with_suffix(""))  # drop ".part": a .wav file is always complete
        log.info("session %s: recorded %.2f s of decoded audio to %s", self.id, self.samples_received / SAMPLE_RATE,
                 path, extra={"session_id": self.id})
