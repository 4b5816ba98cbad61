"""Prometheus metrics: one registry per app (tests run several apps in one process), or, with several worker
processes, prometheus_client's multiprocess mode: each process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (set by the launcher before any process starts) and ``/metrics``, whichever worker
answers it, reports their aggregate (counters and histograms summed over processes; the engine-wide gauges, set
from the engine's own stats, are the most recent value)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kyutai_stt.engine.threads import name_os_thread

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
FINALIZE_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
ENGINE_THREAD_NAME = "stt-engine"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_ENV) or None


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry()
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
            r = None  # values live in the shared folder; this process's objects are not collected directly
        else:
            r = self.registry
        engine_wide = {"multiprocess_mode": "mostrecent"} if self.multiprocess else {}
        per_process = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        self.active_streams = Gauge("kyutai_stt_active_streams", "Streams holding a slot", registry=r, **engine_wide)
        self.slots_total = Gauge("kyutai_stt_slots_total", "Slots (batch size) of the engine", registry=r,
                                 **engine_wide)
        self.queued_clients = Gauge("kyutai_stt_queued_clients", "WebSocket clients waiting for a slot", registry=r,
                                    **per_process)
        self.engine_healthy = Gauge("kyutai_stt_engine_healthy", "1 while the engine worker is running", registry=r,
                                    **engine_wide)
        self.step_seconds = Histogram("kyutai_stt_step_duration_seconds", "Duration of one batched engine step",
                                      buckets=STEP_BUCKETS, registry=r)
        self.finalize_seconds = Histogram(
            "kyutai_stt_finalize_seconds", "From a finalize (Finalize, commit, ForceEndTurn, the server's end of "
            "turn) reaching the stream to its final words, on the server", buckets=FINALIZE_BUCKETS, registry=r)
        self.frames = Counter("kyutai_stt_frames_processed", "80 ms audio frames transcribed", registry=r)
        self.sessions = Counter("kyutai_stt_sessions", "Streams started, by protocol", ["protocol"], registry=r)
        self.errors = Counter("kyutai_stt_errors", "Streams or requests ended by an error, by kind", ["kind"],
                              registry=r)
        self.context_resets = Counter("kyutai_stt_context_resets", "Model context resets of a stream, by reason "
                                      "(stall: the watchdog; client: asked for)", ["reason"], registry=r)
        self._named = False

    # engine worker thread; prometheus_client is thread-safe
    def on_step(self, frames: int, seconds: float, streams: int) -> None:
        if not self._named:  # the first step tells us which thread is the engine's
            self._named = True
            name_os_thread(ENGINE_THREAD_NAME)
        self.step_seconds.observe(seconds)
        self.frames.inc(frames)

    def render(self, engine) -> bytes:
        stats = engine.stats()
        self.active_streams.set(stats.slots_in_use)
        self.slots_total.set(stats.slots_total)
        self.engine_healthy.set(1 if stats.worker_alive else 0)
        return generate_latest(self.registry)
