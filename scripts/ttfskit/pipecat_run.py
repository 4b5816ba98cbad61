"""TTFS through Pipecat's own pipeline, as pipecat-ai/stt-benchmark measures it (docs/measuring-ttfs.md).

Per session: ``Pipeline([transport, VADProcessor(SileroVADAnalyzer(params=VADParams(stop_secs=0.2))),
DeepgramSTTService(base_url=<our server>)])`` with metrics on. The transport plays the plan's utterances at
real-time pace in 20 ms chunks of 16 kHz linear16; after each one it sends silence until the STT service has
reported its TTFS, then a short gap (stt-benchmark's transport does the same). When Silero reports the stop,
Pipecat's DeepgramSTTService sends ``Finalize``; when the ``Results`` with ``from_finalize: true`` arrives, Pipecat
itself reports TTFB = its arrival - (VAD stop - stop_secs) as a ``TTFBMetricsData``: that value is the sample.
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np

from . import light
from .light import SessionResult
from .plan import CHUNK_MS, STOP_SECS, Utterance, int16_bytes, to_rate

RATE = 16000


def _classes():
    """Pipecat's classes (imported late: the light clients and the GPU machine do without Pipecat)."""
    from pipecat.frames.frames import InputAudioRawFrame, MetricsFrame, StartFrame
    from pipecat.metrics.metrics import TTFBMetricsData
    from pipecat.observers.base_observer import BaseObserver
    from pipecat.services.stt_service import STTService
    from pipecat.transports.base_input import BaseInputTransport
    from pipecat.transports.base_transport import TransportParams

    class Collector(BaseObserver):
        """The STT service's TTFB metrics (Pipecat's TTFS); sets ``reported`` at each one."""

        def __init__(self):
            super().__init__()
            self.values: list[float] = []
            self.reported = asyncio.Event()

        async def on_push_frame(self, data) -> None:
            if isinstance(data.source, STTService) and isinstance(data.frame, MetricsFrame):
                for item in data.frame.data:
                    if isinstance(item, TTFBMetricsData) and item.value > 0:
                        self.values.append(item.value)
                        self.reported.set()

    class Transport(BaseInputTransport):
        """Plays utterances at real time; silence until the TTFS is reported (or a timeout), a gap, the next."""

        def __init__(self, speech: list[bytes], collector: Collector, result: SessionResult, gap_s: float,
                     lead_s: float):
            super().__init__(TransportParams(audio_in_enabled=True, audio_in_sample_rate=RATE))
            self.speech, self.collector, self.result = speech, collector, result
            self.gap_s, self.lead_s = gap_s, lead_s
            self.done = asyncio.Event()
            self.chunk = RATE * CHUNK_MS // 1000 * 2
            self.sent = 0
            self.late: list[float] = []

        async def start(self, frame: StartFrame):
            await super().start(frame)
            await self.set_transport_ready(frame)
            self.create_task(self.pump())

        async def push(self, data: bytes, t0: float) -> None:
            due = t0 + self.sent * CHUNK_MS / 1000
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            self.late.append(time.perf_counter() - due)
            await self.push_audio_frame(InputAudioRawFrame(audio=data, sample_rate=RATE, num_channels=1))
            self.sent += 1

        async def pump(self) -> None:
            silence = bytes(self.chunk)
            t0 = time.perf_counter()
            try:
                for _ in range(round(self.lead_s * 1000 / CHUNK_MS)):
                    await self.push(silence, t0)
                for data in self.speech:
                    self.collector.reported.clear()
                    for offset in range(0, len(data), self.chunk):
                        await self.push(data[offset:offset + self.chunk].ljust(self.chunk, b"\0"), t0)
                    deadline = time.perf_counter() + light.FINAL_TIMEOUT_S
                    while not self.collector.reported.is_set() and time.perf_counter() < deadline:
                        await self.push(silence, t0)
                    if not self.collector.reported.is_set():
                        self.result.missing += 1
                    for _ in range(round(self.gap_s * 1000 / CHUNK_MS)):
                        await self.push(silence, t0)
            finally:
                self.result.audio_s = self.sent * CHUNK_MS / 1000
                self.result.late_p99_s = float(np.percentile(self.late, 99)) if self.late else 0.0
                self.done.set()

    return Collector, Transport


async def session(base_http: str, speech: list[bytes], start_delay: float, gap_s: float = 0.3,
                  lead_s: float = 0.5) -> SessionResult:
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.audio.vad_processor import VADProcessor
    from pipecat.services.deepgram.stt import DeepgramSTTService
    from pipecat.workers.runner import WorkerRunner

    Collector, Transport = _classes()
    await asyncio.sleep(start_delay)
    result = SessionResult()
    collector = Collector()
    transport = Transport(speech, collector, result, gap_s, lead_s)
    # a TTFS only from the finalize's acknowledgement: Pipecat's fallback (the last transcript after a 2 s wait) off
    stt = DeepgramSTTService(api_key="unused", base_url=base_http, sample_rate=RATE,
                             stt_ttfb_timeout=light.FINAL_TIMEOUT_S)
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=STOP_SECS)))
    worker = PipelineWorker(Pipeline([transport, vad, stt]), observers=[collector],
                            params=PipelineParams(audio_in_sample_rate=RATE, audio_in_channels=1, enable_metrics=True))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    try:
        await transport.done.wait()
    except Exception as exc:  # noqa: BLE001 - reported, never stops the other sessions
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        await worker.cancel()
        try:
            await running
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the session is over either way
            pass
    result.ttfs = list(collector.values)
    return result


async def run_sessions(base_http: str, source: np.ndarray, utterances: list[Utterance], sessions: int,
                       per_session: int, ramp_s: float = 1.0, seed: int = 0) -> list[SessionResult]:
    import sys

    from loguru import logger

    logger.remove()  # Pipecat logs every frame at DEBUG: warnings only
    logger.add(sys.stderr, level="WARNING")
    speech = [int16_bytes(to_rate(source[u.start:u.start + u.length], RATE)) for u in utterances]
    rng = random.Random(seed)
    return list(await asyncio.gather(*(
        session(base_http, [speech[(s * 5 + i) % len(speech)] for i in range(per_session)], rng.uniform(0, ramp_s))
        for s in range(sessions))))
