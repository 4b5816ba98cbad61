"""The turn layer, once for every dialect: a session's events in, the same events out with the turn's events
among them (``SpeechStarted``, ``EagerEndOfTurn``, ``TurnResumed``, ``EndOfTurn``).

It reads what the reader already gives: ``Text`` (speech is being transcribed), ``Word`` (a word is final), and
each ``Step``'s pause probabilities from the VAD head the model names (``ModelInfo.end_of_turn_head``: the
probability of no voice over its horizon). A turn starts at the first text after the last end of turn. It ends
when that probability crosses ``eot`` upwards after some words (the reader's rule, which it replaces: its own
``EndOfTurn`` is dropped here), after ``timeout_s`` of stream time without new text, or when the client asks
(``force_end``). With ``eager`` set, a crossing of that lower threshold first gives ``EagerEndOfTurn``; text after
it gives ``TurnResumed``, and the turn goes on.

A turn's end never comes before its last word is final. Two ways, chosen by the dialect:
- ``flush`` given (Flux, Realtime's automatic commit): the end (and an eager end) feeds a mid-stream flush
  (``stream.flush.flush_now``) and is emitted when its marker comes back, so every word of the audio so far comes
  before it, whatever the flush's length. Text from before the flush still belongs to the ending turn.
- no ``flush`` (``/v1/stream``): the end waits, if a word is still being spelt, for that word's ``Word``.

Times are stream seconds (the dialect maps them to its client's time, flush silences taken out).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Literal

from kyutai_stt.engine.contract import ModelInfo
from kyutai_stt.messages.events import (EagerEndOfTurn, End, EndOfTurn, Event, Marker, SpeechStarted, Step, Text,
    TurnResumed, Word)

# Markers of the turn layer's own flushes: far from any id a client picks, and never echoed to it.
_OWN_MARKERS = -(1 << 62)


def runner_flush(marker: int) -> float:
    """Placeholder ``flush`` for a tracker whose ends flush: the stream runner puts its own in its place."""
    raise RuntimeError("the turn layer's flush is bound by the stream runner")


@dataclass(frozen=True)
class TurnThresholds:
    eot: float = 0.5  # pause probability that ends a turn
    eager: float | None = None  # lower probability for an eager end; None: no eager ends
    timeout_s: float = math.inf  # a turn with words ends after this much stream time without new text
    head: int | None = None  # the VAD head to read (None: the model's ``end_of_turn_head``)

    def __post_init__(self) -> None:
        if not 0.0 <= self.eot <= 1.0:
            raise ValueError("the end-of-turn threshold is a probability, from 0 to 1")
        if self.eager is not None and not 0.0 <= self.eager <= self.eot:
            raise ValueError("the eager end-of-turn threshold must be from 0 to the end-of-turn threshold")
        if self.timeout_s <= 0:
            raise ValueError("the end-of-turn timeout must be positive")


Trigger = Literal["model", "timeout", "manual"]


class TurnTracker:
    IDLE, SPEAKING, EAGER = "idle", "speaking", "eager"

    def __init__(self, info: ModelInfo, thresholds: TurnThresholds = TurnThresholds(),
                 flush: Callable[[int], object] | None = None):
        self.thresholds = thresholds
        self.flush = flush  # feeds a mid-stream flush with this marker (see the module docstring)
        self._default_head = info.end_of_turn_head
        self._lead, self._rate = info.lead_frames, info.frame_rate
        self._markers = itertools.count(_OWN_MARKERS, -1)
        self.state = self.IDLE
        self.turn_index = 0  # of the current (or next) turn
        self._words = 0  # final words in the current turn
        self._spelling = False  # text came after the last Word: a word is still being spelt
        self._last_pause = 1.0
        self._last_text_time = 0.0
        self._now = 0.0  # stream time of the last step
        self._ending: tuple[int, EagerEndOfTurn | EndOfTurn] | None = None  # (marker, event) of a flush under way
        self._end_due: EndOfTurn | None = None  # the turn's end, held back until its last word (or eager end)

    # ------------------------------------------------------------------ the stream's events in, with turns out
    def feed(self, event: Event) -> list[Event]:
        if isinstance(event, EndOfTurn) and event.trigger == "model":
            return []  # the reader's own: this layer decides
        if isinstance(event, Marker) and event.id <= _OWN_MARKERS:
            return self._flushed(event.id)
        out: list[Event] = [event]
        if isinstance(event, Text):
            self._last_text_time = event.time
            self._spelling = True
            if self.state == self.IDLE:  # (a turn starting inside a forced end's flush is ended by it)
                self.state = self.SPEAKING
                out.append(SpeechStarted(time=event.time))
            elif self._ending is None:
                if self.state == self.EAGER:
                    self.state = self.SPEAKING
                    self._end_due = None
                    out.append(TurnResumed(time=event.time))
        elif isinstance(event, Word):
            self._spelling = False
            self._words += 1
            if self.state == self.IDLE:  # a word without text events
                self.state = self.SPEAKING
                out.insert(0, SpeechStarted(time=event.start_time))
            if self._end_due is not None and self.flush is None and self.state != self.IDLE:
                out += self._end(self._end_due)
        elif isinstance(event, Step):
            self._now = max(0.0, (event.step_idx - self._lead) / self._rate)
            out += self._step(event)
        elif isinstance(event, End):
            self.state = self.IDLE
        return out

    def force_end(self) -> int:
        """The client ends the turn now (Flux ``ForceEndTurn``; needs ``flush``): the marker of the flush to feed
        (the caller feeds it, its decoder's tail first); the ``EndOfTurn`` comes when it is back, with every word
        of the audio so far before it (none when no turn was under way: Flux's state machine ends only turns)."""
        if self.flush is None:
            raise RuntimeError("a forced end of turn needs the flush")
        marker = next(self._markers)
        self._ending = (marker, EndOfTurn(probability=self._last_pause, time=self._now, trigger="manual"))
        return marker

    # ------------------------------------------------------------------ decisions
    def _step(self, step: Step) -> list[Event]:
        out: list[Event] = []
        pause = None
        head = self._default_head if self.thresholds.head is None else self.thresholds.head
        if step.pause_probabilities is not None and head is not None and head < len(step.pause_probabilities):
            pause = step.pause_probabilities[head]
        last, self._last_pause = self._last_pause, (pause if pause is not None else self._last_pause)
        if self._ending is not None:
            marker, event = self._ending
            if isinstance(event, EagerEndOfTurn) and pause is not None and 1.0 > self.thresholds.eot <= pause:
                self._end_due = EndOfTurn(probability=pause, time=self._now)  # right after the eager one
            return out
        if self.state == self.IDLE or not self._words or (self._end_due is not None and self.flush is None):
            return out  # no turn to end, or its end waits for the word being spelt
        if pause is not None:
            eot, eager = self.thresholds.eot, self.thresholds.eager
            if self.state == self.SPEAKING and eager is not None and pause >= eager > last:
                out += self._begin(EagerEndOfTurn(probability=pause, time=self._now))
                if self._ending is not None or self.state != self.EAGER:
                    if pause >= eot:
                        self._end_due = EndOfTurn(probability=pause, time=self._now)
                    return out
            if eot < 1.0 and ((pause >= eot > last) or (self.state == self.EAGER and pause >= eot)):
                return out + self._begin(EndOfTurn(probability=pause, time=self._now))
        if self._now - self._last_text_time >= self.thresholds.timeout_s:
            out += self._begin(EndOfTurn(probability=self._last_pause, time=self._now, trigger="timeout"))
        return out

    def _begin(self, event: EagerEndOfTurn | EndOfTurn) -> list[Event]:
        """An (eager) end decided: flush first, or (no flush) emit it once the word being spelt is final."""
        if self.flush is not None:
            if isinstance(event, EndOfTurn) and self.state == self.EAGER:
                return self._end(event)  # the eager end's flush already made every word final
            marker = next(self._markers)
            self._ending = (marker, event)
            self.flush(marker)
            return []
        if isinstance(event, EagerEndOfTurn):
            self.state = self.EAGER
            return [event]
        if self._spelling:
            self._end_due = event
            return []
        return self._end(event)

    def _flushed(self, marker: int) -> list[Event]:
        if self._ending is None or self._ending[0] != marker:
            return []
        _, event = self._ending
        self._ending = None
        if isinstance(event, EagerEndOfTurn):
            if not self._words:  # nothing to end (a forced end raced it)
                return []
            self.state = self.EAGER
            out: list[Event] = [event]
            if self._end_due is not None:
                out += self._end(self._end_due)
            return out
        if self.state == self.IDLE:  # a forced end with no turn under way: nothing to end
            return []
        return self._end(event)

    def _end(self, event: EndOfTurn) -> list[Event]:
        self.state = self.IDLE
        self._words = 0
        self._end_due = None
        self.turn_index += 1
        return [event]
