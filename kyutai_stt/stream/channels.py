"""Multichannel audio as one session: each channel is a stream of its own in an engine slot of its own, and their
events are merged, tagged with ``channel`` (the simplest diarization: one speaker per channel, as call centres
record them).

``ChannelSession`` has the ``Session`` interface the runner, ``flush_now`` and the service use, so a protocol runs
it like any session. Audio comes as ``[channels, samples]`` (``audio.decoders.ChannelsDecoder``); a 1-D array
(the silence of a mid-stream flush) goes to every channel. Since the engine's results do not depend on the slot or
the neighbours, each channel's words are exactly those of that channel sent alone as a mono stream.

Merged events: one ``Ready`` (once every channel has its slot), each channel's ``Text``/``Word``/``WordEnd``/
``Step``/``EndOfTurn`` tagged with its channel, a ``Marker`` once every channel has echoed it, one ``End`` after
the last channel's; the first channel ``Error`` fails the whole stream. A channel that has echoed a marker the
others have not yet holds back what follows until the merged ``Marker`` is out: the channels' streams are stepped
separately (one may be a step ahead), and a protocol reads the ``Marker`` of a finalize as "what came before it is
the finalized segment", so a word after the marker must never come before it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import Callable

import numpy as np

from kyutai_stt.engine.contract import Engine
from kyutai_stt.messages.events import End, EndOfTurn, Error, Event, Marker, Ready, Step, Text, Word, WordEnd
from kyutai_stt.stream.session import Session

log = logging.getLogger(__name__)

_TAGGED = (Text, Word, WordEnd, Step, EndOfTurn)


class _Channel(Session):
    """One channel's session: its events go to the ``ChannelSession`` instead of a queue of its own."""

    def __init__(self, engine: Engine, forward: Callable[[Event], None], **options):
        super().__init__(engine, **options)
        self._forward = forward

    def _emit(self, event: Event) -> None:
        self._forward(event)


class ChannelSession:
    def __init__(self, engine: Engine, channels: int, *, max_pending_events: int = 0, session_id: str | None = None,
                 **options):
        if channels < 2:
            raise ValueError("a multichannel session has 2 channels or more")
        self.engine = engine
        self.id = session_id or uuid.uuid4().hex[:12]
        # the consumer's backlog is bounded here, on the merged queue (max_pending_events), not per channel
        self.channels = [_Channel(engine, self._forwarder(c), session_id=f"{self.id}.{c}", **options)
                         for c in range(channels)]
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._max_pending = max_pending_events
        self._echoes: Counter[int] = Counter()  # marker id -> channels that echoed it
        self._held: dict[int, list[Event]] = {}  # channel -> its events since its echo of a marker not merged yet
        self._ended: set[int] = set()
        self.dropped = asyncio.Event()
        self.finished = False

    @classmethod
    def from_settings(cls, engine: Engine, settings, channels: int, **overrides) -> "ChannelSession":
        return cls(engine, channels, **{**dict(
            end_of_turn_threshold=settings.end_of_turn_threshold, max_seconds=settings.max_session_s,
            record_dir=settings.record_dir, max_pending_events=settings.max_pending_events,
            max_buffered_seconds=settings.max_buffered_audio_s, spool_memory_seconds=settings.spool_memory_s,
            stall_seconds=settings.stall_seconds), **overrides})

    # ------------------------------------------------------------ the Session interface
    @property
    def samples_received(self) -> int:
        """Samples of each channel (they all get the same number)."""
        return self.channels[0].samples_received

    @property
    def ended(self) -> bool:
        return self.channels[0].ended

    @property
    def frames_done(self) -> int:
        return min(c.frames_done for c in self.channels)

    @property
    def buffered_samples(self) -> int:
        return max(c.buffered_samples for c in self.channels)

    def start(self) -> None:
        """A slot for every channel, or none (``NoFreeSlot``: the slots taken are given back)."""
        try:
            for channel in self.channels:
                channel.start()  # its Ready is not forwarded: the session's own comes once all have a slot
        except BaseException:
            self._give_back()
            raise
        self._emit(Ready())

    async def start_waiting(self, timeout: float) -> None:
        """``start()``, waiting up to ``timeout`` s in all for the slots (one after the other)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for channel in self.channels:
                await channel.start_waiting(max(0.0, deadline - loop.time()))
        except BaseException:
            self._give_back()
            raise
        self._emit(Ready())

    def _give_back(self) -> None:
        for channel in self.channels:
            channel.abort()  # a channel without a slot only frees its spool

    def push_pcm(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, np.float32)
        if pcm.ndim == 1:  # the same audio on every channel (a flush's silence)
            pcm = np.broadcast_to(pcm, (len(self.channels), pcm.size))
        if pcm.shape[0] != len(self.channels):
            raise ValueError(f"audio of {pcm.shape[0]} channels on a stream of {len(self.channels)}")
        for channel, row in zip(self.channels, pcm):
            channel.push_pcm(row)

    def push_marker(self, marker_id: int, finalize: bool = False, frames: int | None = None) -> int:
        # a finalize closes each channel's word in progress (``stream.flush``); the channels wait for as many frames
        return max([channel.push_marker(marker_id, finalize, frames) for channel in self.channels])

    def end(self, flush: bool = True) -> None:
        for channel in self.channels:
            channel.end(flush)

    def abort(self) -> None:
        for channel in self.channels:
            channel.abort()
        self.finished = True

    def fail(self, message: str) -> None:
        if not self.finished:
            self.abort()
            self._queue.put_nowait(Error(message=message))

    async def wait_for_room(self) -> None:
        for channel in self.channels:
            await channel.wait_for_room()

    def __aiter__(self):
        return self._events()

    async def _events(self):
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, (End, Error)):
                return

    # ------------------------------------------------------------ merging the channels' events
    def _forwarder(self, index: int) -> Callable[[Event], None]:
        return lambda event: self._on_channel(index, event)

    def _on_channel(self, index: int, event: Event) -> None:
        if self.finished:
            return
        if index in self._held and not isinstance(event, Error):  # past a marker the others have not echoed yet
            self._held[index].append(event)
        elif isinstance(event, _TAGGED):
            self._emit(event.model_copy(update={"channel": index}))
        elif isinstance(event, Marker):
            self._echoes[event.id] += 1
            if self._echoes[event.id] < len(self.channels):
                self._held[index] = []
                return
            del self._echoes[event.id]
            self._emit(Marker(id=event.id))
            held, self._held = self._held, {}
            for channel, events in held.items():  # each channel's in the order they came (a marker holds again)
                for later in events:
                    self._on_channel(channel, later)
        elif isinstance(event, End):
            self._ended.add(index)
            if len(self._ended) == len(self.channels):
                self.finished = True
                self._emit(End(duration=event.duration))
        elif isinstance(event, Error):
            self.abort()
            self._queue.put_nowait(Error(message=f"channel {index}: {event.message}"))
        # Ready: the session's own, emitted once all slots are taken

    def _emit(self, event: Event) -> None:
        if self._max_pending and self._queue.qsize() >= self._max_pending:
            if not self.dropped.is_set():  # the consumer is stuck: give the slots back, never block the engine
                log.warning("session %s: client is not reading its results, dropping it", self.id,
                            extra={"session_id": self.id})
                self.abort()
                self.dropped.set()
            return
        self._queue.put_nowait(event)

