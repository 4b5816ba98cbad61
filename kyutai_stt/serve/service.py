"""The service behind every endpoint: one typed object instead of loose ``app.state`` fields.

``create_app`` builds one ``Service`` and stores it as ``app.state.service``; handlers reach it through
``get_service(conn)`` (any Request or WebSocket).

It holds the engine, the settings, the metrics, the live sessions (for graceful shutdown), the draining flag and
the admission of new streams (a free slot, or a bounded wait for one on the engine's condition variable).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from kyutai_stt.engine.contract import DecodingOptions, Engine, EngineStopped, NoFreeSlot
from kyutai_stt.serve.metrics import Metrics
from kyutai_stt.serve.pace import RealTimeMonitor
from kyutai_stt.engine.diarization.contract import Diarizer
from kyutai_stt.stream.channels import ChannelSession
from kyutai_stt.stream.speakers import DiarizedSession
from kyutai_stt.stream.session import Session
from kyutai_stt.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Service:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None  # set by create_app's lifespan (or given: an EngineClient, or Modal's shared one)
    sessions: set[Session] = field(default_factory=set)  # live WebSocket sessions
    draining: bool = False  # shutting down: no new streams
    queued: int = 0  # WebSocket clients waiting for a slot
    pace: RealTimeMonitor | None = None  # is the engine keeping real time? (set by ``attach``)
    diarizer: Diarizer | None = None  # speakers for streams that ask (``settings.diarizer``)
    _waits: set[asyncio.Task] = field(default_factory=set, repr=False)

    def attach(self, engine: Engine) -> None:
        """Serve ``engine``: its steps feed the metrics and the real-time monitor (``pace``)."""
        self.pace = RealTimeMonitor(lambda: [s.buffered_samples for s in list(self.sessions)], self.metrics.registry)
        if engine.counts_step_metrics:  # an EngineClient's steps are counted once, in the engine process
            engine.add_step_listener(self.metrics.on_step)
        engine.add_step_listener(self.pace.on_step)
        self.engine = engine

    @property
    def running_engine(self) -> Engine:
        """The engine; ``EngineStopped`` before the lifespan has started it."""
        if self.engine is None:
            raise EngineStopped("the engine is not running")
        return self.engine

    def new_session(self, channels: int = 1, diarize: bool = False,
                    decoding: DecodingOptions | None = None) -> Session | ChannelSession:
        """A live stream's session, bounded by the settings (not started: see ``admit``); with ``channels`` > 1 a
        multichannel one (a slot per channel); with ``diarize`` its words carry speakers (``DiarizedSession``);
        ``decoding``: its sampling and keyterms (``decoding_options``)."""
        extra = dict(decoding=decoding, on_reset=self._count_reset,
                     on_finalized=self.metrics.finalize_seconds.observe)
        if channels > 1:
            return ChannelSession.from_settings(self.running_engine, self.settings, channels, **extra)
        if diarize:
            return DiarizedSession.from_settings(self.running_engine, self.settings, diarizer=self.running_diarizer,
                                                 **extra)
        return Session.from_settings(self.running_engine, self.settings, **extra)

    def decoding_options(self, temperature: float | None = None, seed: int | None = None,
                         keyterms: tuple[str, ...] = ()) -> DecodingOptions:
        """A stream's decoding from what its protocol could say; ``temperature`` None: the server's default.
        ``ValueError`` (a message for the client) when out of range."""
        if temperature is None:
            temperature = self.settings.default_temperature
        return DecodingOptions(temperature=float(temperature), seed=seed, keyterms=tuple(keyterms)).check()

    def _count_reset(self, reason: str) -> None:
        self.metrics.context_resets.labels(reason).inc()

    @property
    def running_diarizer(self) -> Diarizer:
        if self.diarizer is None:
            raise DiarizerMissing("diarize=true needs a server started with a diarizer (--diarizer)")
        return self.diarizer

    async def admit(self, session: Session) -> None:
        """Give ``session`` a slot now, or let it wait in the bounded queue (``queue_max`` clients, each for up to
        ``queue_timeout_s``) on the engine's own wait for a free slot.

        Raises ``NoFreeSlot`` (full, queue full, waited too long, or the server began draining) or
        ``EngineStopped``. On success the session is counted among ``sessions``."""
        try:
            session.start()
        except NoFreeSlot:
            if self.queued >= self.settings.queue_max or self.draining:
                raise
            await self._wait_for_slot(session)
        self.sessions.add(session)

    async def _wait_for_slot(self, session: Session) -> None:
        self.queued += 1
        self.metrics.queued_clients.inc()
        wait = asyncio.ensure_future(session.start_waiting(self.settings.queue_timeout_s))
        self._waits.add(wait)
        try:
            await asyncio.wait({wait})  # not ``await wait``: drain() cancels the wait, not this task
        finally:
            self._waits.discard(wait)
            self.queued -= 1
            self.metrics.queued_clients.dec()
            if not wait.done():  # this task itself was cancelled (client gone)
                wait.cancel()
        if wait.cancelled():
            raise NoFreeSlot("the server is shutting down")
        wait.result()

    def forget(self, session: Session) -> None:
        """The session is over (its slot is given back by the adapter)."""
        self.sessions.discard(session)

    async def drain(self, timeout: float) -> None:
        """Stop taking streams, end every active one (they flush their last words) and wait for them to close."""
        self.draining = True
        for wait in list(self._waits):
            wait.cancel()
        sessions = list(self.sessions)
        if sessions:
            log.info("shutting down: flushing %d active stream(s)", len(sessions))
        for session in sessions:
            session.end()
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.sessions:
            log.warning("shutting down: %d stream(s) did not finish in %.0f s", len(self.sessions), timeout)


class DiarizerMissing(ValueError):
    """A stream asked for speakers on a server without a diarizer."""


def get_service(conn: HTTPConnection) -> Service:
    """The app's ``Service``, from any Request or WebSocket."""
    return conn.app.state.service

