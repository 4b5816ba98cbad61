"""The engine across processes: one engine process owns the model and the device; front-end worker processes
reach it through ``EngineClient``, which implements the same ``engine.contract.Engine``, so ``Session`` and every
protocol adapter run unchanged in a worker.

Transport: ZeroMQ (pyzmq) over ``ipc://`` sockets, messages packed with msgpack (msgspec; the split vLLM uses between its
API servers and its EngineCore). Each worker has one PUSH socket to the engine's PULL socket (requests, audio) and
one DEALER socket, whose routing id names the worker, fed by the engine's ROUTER socket (replies, events). Both
ends batch: everything a process queued since its I/O thread last woke goes out as one message, so a step's events
for a worker are one message, and a worker's pushes between two wakes are one message.

Wire messages are msgspec structs, tagged by their class name, with one encoder and one decoder per direction
(``WorkerBatch`` in, ``EngineBatch`` out): worker -> engine ``Hello``, ``Open``, ``Push`` (float32 PCM bytes),
``Close``, ``Abort``, ``Reset``, ``Reconfigure``, ``Expedite``, ``StatsRequest``, ``Beat``, ``Bye``, and the
launcher's ``Gone`` when a worker process died;
engine -> worker ``Info`` (the engine's ``ModelInfo`` and slots), ``Opened``, ``Refused``, ``Stats``, ``Events``
(the stream's ``EngineEvent``s, the same structs the engine delivers), ``Steps`` (the timing of every engine step since
the last message, sent to every worker, whose step listeners, e.g. the real-time monitor, get them), ``Beat``.

Admission is global and exact: only the engine process allocates slots (``Engine.open`` under its lock).
Liveness: the engine sends a beat to every worker every ``BEAT_SECONDS``; a worker that hears nothing for
``DEAD_AFTER_SECONDS`` fails its streams and reports the engine down (``/status`` 503). Workers beat too; the
engine aborts the streams of a worker it has not heard for ``DEAD_AFTER_SECONDS``, or at once when the launcher
reports the worker process gone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import numpy as np
import zmq

from kyutai_stt.engine.contract import (DecodingOptions, Engine, EngineEvent, EngineStats, EngineStopped, ModelInfo,
    NoFreeSlot, StepListener, StepOutput, StepTiming, StreamClosed, StreamEnd, StreamHandle, StreamFailed,
    call_sink)
from kyutai_stt.engine.threads import name_os_thread

log = logging.getLogger(__name__)

BEAT_SECONDS = 0.5
DEAD_AFTER_SECONDS = 3.0
REQUEST_TIMEOUT_SECONDS = 5.0
OPEN_RETRY_SECONDS = 0.05  # a queued client asks a full engine process again this often
LAUNCHER_ID = "launcher"


@dataclass(frozen=True)
class Endpoints:
    """The engine process's two sockets (``ipc://`` addresses in a private folder)."""

    requests: str  # engine PULL <- worker PUSH
    events: str  # engine ROUTER -> worker DEALER

    @classmethod
    def in_folder(cls, folder: str) -> "Endpoints":
        return cls(f"ipc://{folder}/requests", f"ipc://{folder}/events")


class _Waker:
    """A pipe another thread writes to, so a zmq poller wakes for work queued in Python (zmq sockets are not
    thread-safe: only the I/O thread touches them)."""

    def __init__(self):
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._pending = False

    def wake(self) -> None:
        if not self._pending:
            self._pending = True
            try:
                os.write(self._write_fd, b"x")
            except OSError:
                pass

    def clear(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._pending = False  # after the read: a wake() from now on writes again

    def close(self) -> None:
        for fd in (self.read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------- worker -> engine
class Hello(msgspec.Struct, tag=True):
    """A worker introduces itself (repeated until the engine answers with ``Info``)."""


class Open(msgspec.Struct, tag=True):
    request: int
    options: DecodingOptions | None = None


class StreamCommand(msgspec.Struct):
    """A command about one stream: its slot and the stream's id there (a slot is reused by later streams)."""

    slot: int
    stream: int


class Push(StreamCommand, tag=True):
    pcm: bytes  # float32, native order


class Close(StreamCommand, tag=True):
    """``Engine.close``: no more audio (``flush``: as ``Engine.close``'s)."""

    flush: bool = True


class Abort(StreamCommand, tag=True):
    """``Engine.abort``: drop the stream."""


class Reset(StreamCommand, tag=True):
    """``Engine.reset``: reset the stream's model context."""


class Reconfigure(StreamCommand, tag=True):
    """``Engine.reconfigure``: new decoding options from the stream's frame ``frame`` on."""

    options: DecodingOptions
    frame: int


class Expedite(StreamCommand, tag=True):
    """``Engine.expedite``: a client awaits the outputs up to frame ``frame``."""

    frame: int


class StatsRequest(msgspec.Struct, tag=True):
    request: int


class Beat(msgspec.Struct, tag=True):
    """Both ways: "still here"."""


class Bye(msgspec.Struct, tag=True):
    """The worker stops: free its streams."""


class Gone(msgspec.Struct, tag=True):
    """From the launcher: this worker's process died."""

    worker: str


# stream commands that call one engine method with the stream's handle, nothing else
_ROUTED: dict[type, str] = {Reset: "reset"}
Command = Hello | Open | Push | Close | Abort | Reset | Reconfigure | Expedite | StatsRequest | Beat | Bye | Gone


class WorkerBatch(msgspec.Struct):
    """Everything one worker (or the launcher) queued since its I/O thread last woke: one zmq message."""

    worker: str
    commands: list[Command]


# ---------------------------------------------------------------------------------------------- engine -> worker
class Info(msgspec.Struct, tag=True):
    info: ModelInfo
    batch_size: int


class Opened(msgspec.Struct, tag=True):
    request: int
    slot: int
    stream: int
    seed: int | None = None


class Refused(msgspec.Struct, tag=True):
    request: int
    full: bool  # every slot is in use (else the engine is stopped)
    message: str


class Stats(msgspec.Struct, tag=True):
    request: int
    stats: EngineStats


class Events(msgspec.Struct, tag=True):
    slot: int
    stream: int
    received: int  # samples of this stream the engine process had received when it sent these
    events: list[EngineEvent]


class Steps(msgspec.Struct, tag=True):
    steps: list[tuple[int, float, int]]  # (frames, seconds, streams) per engine step (``StepListener``)


Item = Info | Opened | Refused | Stats | Events | Steps | Beat
EngineBatch = list[Item]  # everything for one worker since the engine's I/O loop last sent: one zmq message

_encode = msgspec.msgpack.Encoder().encode
_decode_commands = msgspec.msgpack.Decoder(WorkerBatch).decode
_decode_items = msgspec.msgpack.Decoder(EngineBatch).decode


def tell_engine_worker_gone(endpoints: "Endpoints", worker: str) -> None:
    """The launcher: a worker process died, free its slots now."""
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoints.requests)
    push.send(_encode(WorkerBatch(LAUNCHER_ID, [Gone(worker)])))
    push.close(linger=2000)


# ====================================================================================== engine process side
@dataclass(eq=False)
class _Route:
    """A stream opened by a worker: where its events go."""

    worker: str
    handle: StreamHandle | None = None
    received: int = 0  # samples pushed so far, as seen by the engine process


class EngineServer:
    """Serves one running ``Engine`` to worker processes. ``run()`` blocks (the engine process's main thread)
    until ``stop()``."""

    def __init__(self, engine: Engine, endpoints: Endpoints):
        self.engine = engine
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(endpoints.requests)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.SNDHWM, 0)  # events are never dropped for a slow worker (the engine must not block)
        self._router.bind(endpoints.events)
        self._waker = _Waker()
        self._outbox: deque[tuple[_Route, list[EngineEvent]]] = deque()
        self._steps: deque[tuple[int, float, int]] = deque()  # steps not yet sent to the workers
        engine.add_step_listener(self._on_step)
        self._routes: dict[tuple[int, int], _Route] = {}
        self._workers: dict[str, float] = {}  # worker id -> last time heard
        self._stopping = threading.Event()
        self._info = Info(engine.info, engine.batch_size)

    def stop(self) -> None:
        self._stopping.set()
        self._waker.wake()

    # engine worker thread
    def _on_step(self, frames: int, seconds: float, streams: int) -> None:
        self._steps.append((frames, seconds, streams))  # sent with the step's events (the engine calls listeners first)
        self._waker.wake()

    def _sink_for(self, route: _Route) -> Callable[[list[EngineEvent]], None]:
        def sink(events: list[EngineEvent]) -> None:
            self._outbox.append((route, events))
            self._waker.wake()
        return sink

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._waker.read_fd, zmq.POLLIN)
        next_beat = time.monotonic()
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(timeout=BEAT_SECONDS * 1000 / 2))
                if self._pull in ready:
                    for _ in range(256):  # bounded, so events keep flowing under a flood of pushes
                        try:
                            message = self._pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(_decode_commands(message))
                if self._waker.read_fd in ready:
                    self._waker.clear()
                self._send_events()
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + BEAT_SECONDS
                    self._beat(now)
        finally:
            self._pull.close(linger=0)
            self._router.close(linger=0)
            self._ctx.term()
            self._waker.close()

    def _reply(self, worker: str, items: EngineBatch) -> None:
        self._router.send_multipart([worker.encode(), _encode(items)])

    def _beat(self, now: float) -> None:
        for worker, heard in list(self._workers.items()):
            if now - heard > DEAD_AFTER_SECONDS:
                log.warning("worker %s silent for %.1f s: dropping its streams", worker, now - heard)
                self._drop_worker(worker)
            else:
                self._reply(worker, [Beat()])

    def _drop_worker(self, worker: str) -> None:
        self._workers.pop(worker, None)
        for key, route in list(self._routes.items()):
            if route.worker == worker:
                self.engine.abort(route.handle)
                del self._routes[key]

    def _handle(self, batch: WorkerBatch) -> None:
        worker = batch.worker
        if worker == LAUNCHER_ID:
            for command in batch.commands:
                if isinstance(command, Gone):
                    log.warning("worker %s exited: freeing its %d slot(s)", command.worker,
                                sum(r.worker == command.worker for r in self._routes.values()))
                    self._drop_worker(command.worker)
            return
        replies: EngineBatch = []
        unknown: set[tuple[int, int]] = set()
        self._workers[worker] = time.monotonic()
        for command in batch.commands:
            if isinstance(command, Push):
                key = (command.slot, command.stream)
                route = self._routes.get(key)
                if route is not None:
                    pcm = np.frombuffer(command.pcm, np.float32)
                    route.received += pcm.size
                    try:
                        self.engine.push(route.handle, pcm)
                    except StreamClosed:
                        pass  # the stream failed or ended; its last events are on their way
                elif key not in unknown:
                    # dropped here (its worker was silent too long, or it failed): say so, or it waits forever
                    unknown.add(key)
                    replies.append(Events(command.slot, command.stream, 0, [StreamFailed("the stream was dropped")]))
            elif isinstance(command, Open):
                replies.append(self._open(worker, command.request, command.options))
            elif type(command) in _ROUTED:
                route = self._routes.get((command.slot, command.stream))
                if route is not None:
                    getattr(self.engine, _ROUTED[type(command)])(route.handle)
            elif isinstance(command, Close):
                route = self._routes.get((command.slot, command.stream))
                if route is not None:
                    self.engine.close(route.handle, command.flush)
            elif isinstance(command, Reconfigure):
                route = self._routes.get((command.slot, command.stream))
                if route is not None:
                    try:
                        self.engine.reconfigure(route.handle, command.options, command.frame)
                    except ValueError:  # the worker checked the options; only a keyterm trie too big is left
                        log.warning("stream %d: new decoding options refused", command.stream, exc_info=True)
            elif isinstance(command, Expedite):
                route = self._routes.get((command.slot, command.stream))
                if route is not None:
                    self.engine.expedite(route.handle, command.frame)
            elif isinstance(command, Abort):
                route = self._routes.pop((command.slot, command.stream), None)
                if route is not None:
                    self.engine.abort(route.handle)
            elif isinstance(command, StatsRequest):
                replies.append(Stats(command.request, self.engine.stats()))
            elif isinstance(command, Hello):
                replies.append(self._info)
            elif isinstance(command, Bye):
                self._drop_worker(worker)
        if replies:
            self._reply(worker, replies)

    def _open(self, worker: str, request: int, options: DecodingOptions | None) -> Opened | Refused:
        route = _Route(worker)
        try:
            handle = self.engine.open(self._sink_for(route), options=options)
        except NoFreeSlot as exc:
            return Refused(request, True, str(exc))
        except EngineStopped as exc:
            return Refused(request, False, str(exc))
        except ValueError as exc:  # options the engine refuses (checked by the worker first: rare)
            return Refused(request, False, f"invalid decoding options: {exc}")
        route.handle = handle
        self._routes[(handle.slot, handle.stream_id)] = route
        return Opened(request, handle.slot, handle.stream_id, handle.seed)

    def _send_events(self) -> None:
        """Everything the engine delivered since the last call: one message per worker."""
        by_worker: dict[str, EngineBatch] = {}
        while self._outbox:
            route, events = self._outbox.popleft()
            handle = route.handle
            if handle is None:
                continue
            key = (handle.slot, handle.stream_id)
            if any(isinstance(e, (StreamEnd, StreamFailed)) for e in events):
                self._routes.pop(key, None)  # ended or failed: the engine freed the slot
            by_worker.setdefault(route.worker, []).append(
                Events(handle.slot, handle.stream_id, route.received, events))
        # After the events: the engine calls step listeners before it delivers, so the timings of every step whose
        # events were just taken are queued by now, and go first (a worker's monitor sees the step before its end).
        steps = []
        while self._steps:
            steps.append(self._steps.popleft())
        if steps:  # every worker: a worker with no stream still answers /status for the whole server
            for worker in self._workers:
                by_worker.setdefault(worker, []).insert(0, Steps(steps))
        for worker, items in by_worker.items():
            if worker in self._workers:
                self._reply(worker, items)


# ====================================================================================== worker process side
@dataclass(eq=False)
class _Stream:
    sink: Callable[[list[EngineEvent]], None]
    sent: int = 0  # samples pushed by this worker
    reported: int = 0  # buffered samples the engine reported in its last events
    received_at_report: int = 0  # samples the engine had received when it sent them
    closing: bool = False


@dataclass(eq=False)
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    reply: Item | None = None
    sink: Callable[[list[EngineEvent]], None] | None = None


class EngineClient:
    """``engine.contract.Engine``, served by an engine in another process.

    ``open`` and ``stats`` wait for the engine's answer (at most ``REQUEST_TIMEOUT_SECONDS``; an open takes a
    round trip, well under a millisecond over ``ipc://`` when the engine is idle); ``push``, ``close`` and
    ``abort`` are queued and sent in order by the I/O thread. Sinks are called on the I/O thread, as the engine
    calls them on its worker thread. ``buffered_samples`` is computed here from the engine's last report plus what
    was sent since, so backpressure needs no round trip. The model itself stays in the engine process: ``info``
    (its ``ModelInfo``, sent in the handshake) is all a worker needs of it.
    """

    counts_step_metrics = False  # the engine process records the step metrics once, for the whole server

    def __init__(self, endpoints: Endpoints, worker_id: str, connect_timeout: float = 60.0):
        self.worker_id = worker_id
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.connect(endpoints.requests)
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.ROUTING_ID, worker_id.encode())
        self._dealer.setsockopt(zmq.RCVHWM, 0)
        self._dealer.connect(endpoints.events)
        self._waker = _Waker()
        self._outbox: deque[Command] = deque()
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._pending: dict[int, _Pending] = {}
        self._requests = itertools.count(1)
        self._lock = threading.Lock()  # guards _streams and _pending between the caller and the I/O thread
        self._step_listeners: list[StepListener] = []
        self._hello: Info | None = None
        self._info_ready = threading.Event()
        self._last_heard = time.monotonic()
        self._engine_alive = True
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="stt-ipc-client", daemon=True)
        self._thread.start()
        if not self._info_ready.wait(connect_timeout):
            self.stop()
            raise EngineStopped(f"no answer from the engine process within {connect_timeout:g} s")
        self.info: ModelInfo = self._hello.info
        self.batch_size: int = self._hello.batch_size

    # ---------------------------------------------------------------- engine.contract.Engine
    @property
    def alive(self) -> bool:
        return self._engine_alive and not self._stopping

    def open(self, sink, timeout: float = 0.0, options: DecodingOptions | None = None) -> StreamHandle:
        """``Engine.open`` across processes: the engine process allocates the slot (admission stays global).
        With ``timeout``, a full engine is asked again every ``OPEN_RETRY_SECONDS`` until then (the engine
        process never blocks its loop on one worker's wait); the caller is a waiting thread (``slots``)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            request = next(self._requests)
            reply = self._request(request, Open(request, options.check() if options else None), sink)
            if isinstance(reply, Opened):
                return StreamHandle(reply.slot, reply.stream, reply.seed)
            assert isinstance(reply, Refused)
            if not reply.full:
                raise EngineStopped(reply.message)
            if time.monotonic() + OPEN_RETRY_SECONDS > deadline:
                raise NoFreeSlot(reply.message)
            time.sleep(OPEN_RETRY_SECONDS)

    def push(self, handle: StreamHandle, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if not pcm.size:
            return
        stream = self._streams.get((handle.slot, handle.stream_id))
        if stream is None or stream.closing:
            raise StreamClosed("stream is closed")
        stream.sent += pcm.size
        self._send(Push(handle.slot, handle.stream_id, pcm.tobytes()))

    def close(self, handle: StreamHandle, flush: bool = True) -> None:
        stream = self._streams.get((handle.slot, handle.stream_id))
        if stream is not None and not stream.closing:
            stream.closing = True
            self._send(Close(handle.slot, handle.stream_id, flush))

    def abort(self, handle: StreamHandle) -> None:
        with self._lock:
            stream = self._streams.pop((handle.slot, handle.stream_id), None)
        if stream is not None:
            self._send(Abort(handle.slot, handle.stream_id))

    def reset(self, handle: StreamHandle) -> None:
        if (handle.slot, handle.stream_id) in self._streams:
            self._send(Reset(handle.slot, handle.stream_id))

    def reconfigure(self, handle: StreamHandle, options: DecodingOptions, frame: int) -> None:
        if (handle.slot, handle.stream_id) in self._streams:
            self._send(Reconfigure(handle.slot, handle.stream_id, options, frame))

    def expedite(self, handle: StreamHandle, frame: int) -> None:
        if (handle.slot, handle.stream_id) in self._streams:
            self._send(Expedite(handle.slot, handle.stream_id, frame))

    def buffered_samples(self, handle: StreamHandle) -> int:
        stream = self._streams.get((handle.slot, handle.stream_id))
        if stream is None:
            return 0
        return max(0, stream.reported + stream.sent - stream.received_at_report)

    def stats(self) -> EngineStats:
        if self.alive:
            try:
                request = next(self._requests)
                reply = self._request(request, StatsRequest(request), timeout=2.0)
                assert isinstance(reply, Stats)
                stats = reply.stats
                stats.worker_alive = stats.worker_alive and self.alive
                return stats
            except EngineStopped:
                pass
        return EngineStats(self.batch_size, 0, 0, 0, False, 0.0, 0)

    def add_step_listener(self, listener: StepListener) -> None:
        """Call ``listener(frames, seconds, streams)`` for every engine step, on the I/O thread, as the engine process
        reports them (with the step's events): the real-time monitor of each worker. The step metrics are not
        counted here but in the engine process (``counts_step_metrics``), or /metrics would sum them N+1 times."""
        self._step_listeners.append(listener)

    def add_step_timing_listener(self, listener: Callable[[StepTiming], None]) -> None:
        """Per-part step timings force a device sync in every step of the engine process: benchmarks register
        them on an engine in their own process (``scripts/benchkit``), never across processes."""
        raise NotImplementedError("step timings are measured in the engine's own process")

    def stop(self) -> None:
        if self._stopping:
            return
        self._send(Bye())  # the I/O thread sends what is queued before it closes
        self._stopping = True
        self._waker.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    # ---------------------------------------------------------------- internals
    def _send(self, command: Command) -> None:
        self._outbox.append(command)
        self._waker.wake()

    def _request(self, request: int, command: Command, sink=None, timeout: float = REQUEST_TIMEOUT_SECONDS) -> Item:
        pending = _Pending(sink=sink)
        with self._lock:
            self._pending[request] = pending
        self._send(command)
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(request, None)
            raise EngineStopped(f"no answer from the engine process within {timeout:g} s")
        if pending.reply is None:
            raise EngineStopped("the engine is not running")
        return pending.reply

    def _flush_outbox(self) -> None:
        commands = []
        while self._outbox:
            commands.append(self._outbox.popleft())
        if commands:
            self._push.send(_encode(WorkerBatch(self.worker_id, commands)))

    def _run(self) -> None:
        name_os_thread("stt-ipc-client")
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._waker.read_fd, zmq.POLLIN)
        next_beat = 0.0
        try:
            while not self._stopping:
                now = time.monotonic()
                if self._hello is None and now >= next_beat:
                    self._outbox.appendleft(Hello())  # repeated until the engine's ROUTER knows this worker
                    next_beat = now + 0.2
                elif now >= next_beat:
                    self._outbox.append(Beat())
                    next_beat = now + BEAT_SECONDS
                self._flush_outbox()
                ready = dict(poller.poll(timeout=100))
                if self._waker.read_fd in ready:
                    self._waker.clear()
                if self._dealer in ready:
                    while True:
                        try:
                            message = self._dealer.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._last_heard = time.monotonic()
                        for item in _decode_items(message):
                            self._on_item(item)
                if self._hello is not None and self._engine_alive and \
                        time.monotonic() - self._last_heard > DEAD_AFTER_SECONDS:
                    self._engine_gone()
        finally:
            with contextlib.suppress(zmq.ZMQError):
                self._flush_outbox()
            self._push.close(linger=200)
            self._dealer.close(linger=0)
            self._ctx.term()
            self._waker.close()

    def _on_item(self, item: Item) -> None:
        if isinstance(item, Steps):
            for frames, seconds, streams in item.steps:
                for listener in self._step_listeners:
                    listener(frames, seconds, streams)
        elif isinstance(item, Events):
            key = (item.slot, item.stream)
            events = item.events
            with self._lock:
                stream = self._streams.get(key)
                if stream is not None and any(isinstance(e, (StreamEnd, StreamFailed)) for e in events):
                    del self._streams[key]
            if stream is None:
                return  # aborted here already
            last = next((e for e in reversed(events) if isinstance(e, StepOutput)), None)
            if last is not None:
                stream.reported, stream.received_at_report = last.buffered_samples, item.received
            call_sink(stream.sink, events)
        elif isinstance(item, (Opened, Refused, Stats)):
            with self._lock:
                pending = self._pending.pop(item.request, None)
                if pending is not None and isinstance(item, Opened):
                    # the engine holds the silence prefix of a new stream before its audio
                    prefix = self.info.prefix_frames * self.info.frame_size
                    self._streams[(item.slot, item.stream)] = _Stream(pending.sink, reported=prefix)
            if pending is None:
                if isinstance(item, Opened):  # the caller gave up waiting: give the slot back
                    self._outbox.append(Abort(item.slot, item.stream))
                return
            pending.reply = item
            pending.done.set()
        elif isinstance(item, Info):
            if self._hello is None:
                self._hello = item
                self._info_ready.set()

    def _engine_gone(self) -> None:
        log.error("no word from the engine process for %.0f s: failing every stream", DEAD_AFTER_SECONDS)
        self._engine_alive = False
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.done.set()  # reply None: EngineStopped
        for stream in streams:
            call_sink(stream.sink, [StreamFailed("the engine stopped")])
