"""Is the engine keeping real time? A real-time factor from its steps, a backlog from its streams, a warning.

Each engine step advances every stream holding audio by ``frames_per_step`` 80 ms frames, whatever the batch
(streams slow down evenly), so the real-time factor of the engine is

    real_time_factor = wall seconds of the recent steps / audio seconds they advanced each stream by

(A Kyutai engine on the CPU steps more frames at once when every stream it steps has them waiting,
``max_frames_per_step``; such a step is counted here as ``frames_per_step`` frames, so while the engine catches up
the factor overstates how slow it is: the backlog figure is then the one to read.)

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

log = logging.getLogger(__name__)

WINDOW_SECONDS = 5.0  # steps of the last few seconds make the figure: one slow step is not a trend
SLOW_ABOVE = 1.0
BACK_BELOW = 0.9


class RealTimeMonitor:
    """Step listener (``Engine.add_step_listener``) computing the engine's real-time factor.

    ``frames_per_step``: frames each stream advances per step. ``backlogs``: returns the samples each live
    stream has received and not yet transcribed (engine buffer + spool), for the backlog figure."""

    def __init__(self, frames_per_step: int, backlogs: Callable[[], Iterable[int]] = lambda: (),
                 registry: CollectorRegistry | None = None):
        self.step_audio_seconds = frames_per_step / FRAME_RATE
        self._backlogs = backlogs
        self._steps: deque[tuple[float, float]] = deque()  # (time of the step's end, its wall seconds)
        self._lock = threading.Lock()
        self.slow = False  # in a slow episode (warned)
        if registry is not None:
            Gauge("kyutai_stt_real_time_factor", "Wall time of recent engine steps over the audio time they "
                  "advance each stream by (above 1: slower than real time)", registry=registry
                  ).set_function(self.real_time_factor)
            Gauge("kyutai_stt_max_backlog_seconds", "Longest backlog of any stream: audio received and not yet "
                  "transcribed, in seconds", registry=registry).set_function(self.max_backlog_seconds)

    def on_step(self, frames: int, seconds: float) -> None:  # engine worker thread
        now = time.monotonic()
        with self._lock:
            self._steps.append((now, seconds))
            while self._steps and self._steps[0][0] < now - WINDOW_SECONDS:
                self._steps.popleft()
            factor = self._factor()
        if factor > SLOW_ABOVE and not self.slow:
            self.slow = True
            log.warning("engine slower than real time (real-time factor %.2f): every stream is transcribed at "
                        "%.0f%% of real pace, its audio waits in the server (longest backlog %.1f s)",
                        factor, 100 / factor, self.max_backlog_seconds())
        elif factor < BACK_BELOW and self.slow:
            self.slow = False
            log.info("engine back to real time (real-time factor %.2f)", factor)

    def _factor(self) -> float:
        if not self._steps:
            return 0.0
        return sum(s for _, s in self._steps) / (len(self._steps) * self.step_audio_seconds)

    def real_time_factor(self) -> float:
        """Recent steps' wall time over the audio time they advanced each stream by (0 when idle)."""
        with self._lock:
            if self._steps and self._steps[-1][0] < time.monotonic() - WINDOW_SECONDS:
                self._steps.clear()  # idle: nothing recent
            return self._factor()

    def max_backlog_seconds(self) -> float:
        try:
            return max(self._backlogs(), default=0) / SAMPLE_RATE
        except RuntimeError:  # the set of streams changed while read from the engine thread: a figure for a log
            return 0.0
