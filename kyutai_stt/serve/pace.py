"""Is the engine keeping real time? A real-time factor from its steps, a backlog from its streams, a warning.

Over the last few seconds of steps,

    real_time_factor = wall seconds of the steps / audio seconds they advanced each stream by, on average
                     = sum(seconds) / sum(frames x 0.08 s / streams), per step

Steps need not advance every stream alike: a Kyutai engine's lane steps serve some streams only, and its bigger steps
carry more frames for the streams that have them waiting (``max_frames_per_step``), so each step counts the frames
it delivered shared among the streams the engine is serving then (its ``streams``: those stepped in the last 5 s
that still hold their slot, ``contract.StepListener``), not a count of steps. (Counting steps, as this did before,
read 1.01 for three streams taking turns in big steps on an engine 85 % busy, and warned.) The warning waits for a
second of each stream's audio in the window (streams that just came are no trend). A stream that sends faster than
real time has more frames stepped than the others and lowers the average: the backlog figure says who waits.

Above 1 the engine is slower than real time: a client sending at real pace gets its words later and later (its
audio waits in the session's spool, never lost) and the log says so once per episode; back under 0.9 it says
that too. ``/status`` and ``/metrics`` show the factor and the longest backlog of any stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Gauge

from kyutai_stt.audio.constants import FRAME_RATE, SAMPLE_RATE
from kyutai_stt.engine.contract import ACTIVE_SECONDS

log = logging.getLogger(__name__)

# steps of the last few seconds make the figure (one slow step is not a trend); the engine counts the streams it
# stepped over the same time
WINDOW_SECONDS = ACTIVE_SECONDS
SLOW_ABOVE = 1.0
BACK_BELOW = 0.9


class RealTimeMonitor:
    """Step listener (``Engine.add_step_listener``) computing the engine's real-time factor.

    ``backlogs``: returns the samples each live stream has received and not yet transcribed (engine buffer +
    spool), for the backlog figure."""

    def __init__(self, backlogs: Callable[[], Iterable[int]] = lambda: (), registry: CollectorRegistry | None = None):
        self._backlogs = backlogs
        # (time of the step's end, its wall seconds, the frames it advanced each stream by on average: its frames
        # shared among the streams the engine is stepping)
        self._steps: deque[tuple[float, float, float]] = deque()
        self._lock = threading.Lock()
        self.slow = False  # in a slow episode (warned)
        if registry is not None:
            Gauge("kyutai_stt_real_time_factor", "Wall time of recent engine steps over the audio time they "
                  "advance each stream by (above 1: slower than real time)", registry=registry
                  ).set_function(self.real_time_factor)
            Gauge("kyutai_stt_max_backlog_seconds", "Longest backlog of any stream: audio received and not yet "
                  "transcribed, in seconds", registry=registry).set_function(self.max_backlog_seconds)

    def on_step(self, frames: int, seconds: float, streams: int) -> None:  # engine worker thread
        now = time.monotonic()
        with self._lock:
            self._steps.append((now, seconds, frames / max(1, streams)))
            while self._steps and self._steps[0][0] < now - WINDOW_SECONDS:
                self._steps.popleft()
            busy, advanced = self._totals()
        factor = self._factor(busy, advanced)
        # a verdict needs a second of each stream's audio: the first steps of streams that just came (their init
        # steps carry no audio) are no trend
        if factor > SLOW_ABOVE and not self.slow and advanced >= FRAME_RATE:
            self.slow = True
            log.warning("engine slower than real time (real-time factor %.2f): every stream is transcribed at "
                        "%.0f%% of real pace, its audio waits in the server (longest backlog %.1f s)",
                        factor, 100 / factor, self.max_backlog_seconds())
        elif factor < BACK_BELOW and self.slow:
            self.slow = False
            log.info("engine back to real time (real-time factor %.2f)", factor)

    def _totals(self) -> tuple[float, float]:
        """(wall seconds, frames each stream advanced by on average) of the steps in the window."""
        return sum(s for _, s, _ in self._steps), sum(f for _, _, f in self._steps)

    @staticmethod
    def _factor(seconds: float, frames: float) -> float:
        return seconds / (frames / FRAME_RATE) if frames else 0.0

    def real_time_factor(self) -> float:
        """Recent steps' wall time over the audio time they advanced each stream by (0 when idle)."""
        with self._lock:
            if self._steps and self._steps[-1][0] < time.monotonic() - WINDOW_SECONDS:
                self._steps.clear()  # idle: nothing recent
            return self._factor(*self._totals())

    def max_backlog_seconds(self) -> float:
        try:
            return max(self._backlogs(), default=0) / SAMPLE_RATE
        except RuntimeError:  # the set of streams changed while read from the engine thread: a figure for a log
            return 0.0
