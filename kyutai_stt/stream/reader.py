"""One stream's engine outputs read as events: steps, text, words and their ends, end of turn.

The one place engine outputs become events, for ``Session`` (every protocol, the Modal Queue) and for the
in-process ``LocalStream`` alike; markers and the stream's end are the session's own bookkeeping.
"""

from __future__ import annotations

from kyutai_stt.engine.contract import ModelInfo, StepOutput, StreamEnd
from kyutai_stt.messages.events import EndOfTurn, Event, Step, Word, WordEnd
from kyutai_stt.stream.words import WordAssembler


class OutputReader:
    def __init__(self, info: ModelInfo, end_of_turn_threshold: float = 0.5):
        self.words = WordAssembler.for_model(info)
        self._end_of_turn_head = info.end_of_turn_head
        self._threshold = end_of_turn_threshold
        self._last_pause = 1.0
        self._words_in_turn = 0
        self.frames_done = 0  # frames of the stream the engine has processed

    def set_audio_end(self, seconds: float) -> None:
        """The client's audio ends here: no time past it (the flush silence after it is not audio)."""
        self.words.audio_end = seconds

    def step(self, out: StepOutput, buffered_samples: int) -> list[Event]:
        """A ``Step``, then the text and words of its token, then an ``EndOfTurn`` when the pause head crosses the
        threshold upwards after a word."""
        self.frames_done = out.frame + 1
        events: list[Event] = [Step(step_idx=out.frame, pause_probabilities=out.pauses,
                                    buffered_samples=buffered_samples)]
        for token in (out.token, *out.more_tokens):  # RNNT models may emit several tokens in one frame
            for event in self.words.feed(out.frame, token):
                if isinstance(event, Word):
                    self._words_in_turn += 1
                events.append(event)
        if out.pauses is not None and self._end_of_turn_head is not None:
            pause = out.pauses[self._end_of_turn_head]
            if pause >= self._threshold > self._last_pause and self._words_in_turn:
                events.append(EndOfTurn(probability=pause, time=self.words.time(out.frame)))
                self._words_in_turn = 0
            self._last_pause = pause
        return events

    def finalize(self) -> list[Word | WordEnd]:
        """A mid-stream flush was transcribed (``flush.flush_now``): the word in progress is complete, closed at
        the end of the flush (stream time, inside the flush silence: ``flush.Timeline`` maps it to where the
        client's audio ended), exactly as at the end of a stream."""
        return self.words.finish(self.frames_done)

    def end(self, end: StreamEnd) -> list[Word | WordEnd]:
        """The stream was flushed: the last word, closed at the end of the audio."""
        self.frames_done = end.frames
        return self.words.finish(end.frames)

