"""Speakers on words: a session whose audio also goes to a streaming diarizer (``engine.diarization``), and whose
words get the speaker the diarizer heard over their span.

``DiarizedSession`` is a ``Session`` (any model family: it only sees the stream's audio and its words). Every
``Word`` waits until its end is known (its ``WordEnd``) and the diarizer has labelled the frames up to that end,
then goes out with ``speaker``: the speaker with the most activity summed over the diarizer frames the word
overlaps. Events behind a waiting word wait with it, so the order never changes; the stream's ``End`` waits for the
diarizer's end. The cost is latency: a word comes once the next word starts and the diarizer's chunk (0.48 s, plus
its 80 ms right context for Sortformer) has covered it.

Speakers are numbered as the diarizer numbers them (Sortformer: in order of first appearance, 0 first).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.engine.contract import Engine
from kyutai_stt.engine.diarization.contract import DiarizationEnd, DiarizationEvent, Diarizer, SpeakerFrames
from kyutai_stt.messages.events import End, Error, Event, Word, WordEnd
from kyutai_stt.stream.session import Session


def word_speaker(activity: np.ndarray, frame_seconds: float, offset: float, start: float, end: float) -> int:
    """The speaker with the most activity over ``[start, end]`` (``activity``: ``[frames, speakers]``, frame ``i``
    covering ``offset + i * frame_seconds`` onwards); a word shorter than a frame takes the frame of its middle."""
    first = int(np.floor((start - offset) / frame_seconds))
    last = int(np.ceil((end - offset) / frame_seconds))
    if last <= first:
        first = int(np.floor(((start + end) / 2 - offset) / frame_seconds))
        last = first + 1
    span = activity[max(first, 0):max(last, 0)]
    if not len(span):
        return 0
    return int(np.argmax(span.sum(axis=0)))


class DiarizedSession(Session):
    def __init__(self, engine: Engine, diarizer: Diarizer, **options):
        super().__init__(engine, **options)
        self.diarizer = diarizer
        self._diarization: int | None = None
        self._activity: list[list[float]] = []  # [frame][speaker]
        self._diarized = False  # the diarizer is done with this stream
        self._held: deque[Event] = deque()

    @property
    def labelled_until(self) -> float:
        """Stream time up to which the diarizer has labelled the audio."""
        if self._diarized:
            return float("inf")
        info = self.diarizer.info
        return info.offset_seconds + len(self._activity) * info.frame_seconds

    # ------------------------------------------------------------ input: the diarizer hears what the engine hears
    def start(self) -> None:
        super().start()
        self._diarization = self.diarizer.open(self._diarizer_sink)

    async def start_waiting(self, timeout: float) -> None:
        await super().start_waiting(timeout)
        self._diarization = self.diarizer.open(self._diarizer_sink)

    def push_pcm(self, pcm) -> None:
        before = self.samples_received
        super().push_pcm(pcm)
        if self._diarization is not None and self.samples_received > before:
            self.diarizer.push(self._diarization, np.asarray(pcm, np.float32).reshape(-1))

    def end(self, flush: bool = True) -> None:
        super().end(flush)
        if self._diarization is not None:
            self.diarizer.close(self._diarization)

    def abort(self) -> None:
        super().abort()
        if self._diarization is not None:
            self.diarizer.abort(self._diarization)

    def _diarizer_sink(self, events: list[DiarizationEvent]) -> None:  # the diarizer's thread
        try:
            self._loop.call_soon_threadsafe(self._on_diarizer, events)
        except RuntimeError:  # event loop closed
            pass

    def _on_diarizer(self, events: list[DiarizationEvent]) -> None:
        for event in events:
            if isinstance(event, SpeakerFrames):
                self._activity += event.probabilities
            elif isinstance(event, DiarizationEnd):
                self._diarized = True
        self._release()

    # ------------------------------------------------------------ output: words wait for their speaker
    def _emit(self, event: Event) -> None:
        if isinstance(event, Error):  # nothing more will come: what is held goes out as it is
            self._held.append(event)
            self._release(force=True)
            return
        self._held.append(event)
        self._release()

    def _release(self, force: bool = False) -> None:
        while self._held:
            head = self._held[0]
            if isinstance(head, Word):
                end = self._word_end(head)
                if not force and (end is None or self.labelled_until <= end):  # > : a word shorter than a frame takes the frame of its middle
                    return
                head = head.model_copy(update={"speaker": self._speaker(head.start_time, end)})
            elif isinstance(head, End) and not force and not self._diarized:
                return
            self._held.popleft()
            super()._emit(head)

    def _word_end(self, word: Word) -> float | None:
        """Where the held ``word`` ends, as ``WordPairer`` pairs it: its ``WordEnd``, the next word's start, or
        the end of the audio; None while unknown."""
        for event in list(self._held)[1:]:
            if isinstance(event, WordEnd):
                return max(event.stop_time, word.start_time)
            if isinstance(event, Word):
                return event.start_time
            if isinstance(event, End):
                return self.samples_received / SAMPLE_RATE
        return None

    def _speaker(self, start: float, end: float | None) -> int:
        info = self.diarizer.info
        activity = np.asarray(self._activity, np.float32).reshape(-1, info.speakers)
        return word_speaker(activity, info.frame_seconds, info.offset_seconds, start,
                            end if end is not None else start)
