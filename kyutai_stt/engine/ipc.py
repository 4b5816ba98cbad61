"""The engine across processes: one engine process owns the model and the device; front-end worker processes
reach it through ``EngineClient``, which has the ``Engine``'s own stream interface, so ``Session`` and every
protocol adapter run unchanged in a worker.

Transport: ZeroMQ (pyzmq) over ``ipc://`` sockets, messages packed with msgpack (the split vLLM uses between its
API servers and its EngineCore). Each worker has one PUSH socket to the engine's PULL socket (requests, audio) and
one DEALER socket, whose routing id names the worker, fed by the engine's ROUTER socket (replies, events). Both
ends batch: everything a process queued since its I/O thread last woke goes out as one message, so a step's events
for a worker are one message, and a worker's pushes between two wakes are one message.

Wire messages are msgpack lists. Worker -> engine: ``[worker_id, command, ...]`` with commands
``["hello"]``, ``["open", request]``, ``["push", slot, stream, pcm_f32le]``, ``["close", slot, stream]``,
``["abort", slot, stream]``, ``["stats", request]``, ``["beat"]``, ``["bye"]``; the launcher sends
``["gone", worker_id]`` when a worker process died. Engine -> worker: a list of items ``["info", {...}]``,
``["opened", request, slot, stream]``, ``["refused", request, kind, message]``, ``["stats", request, {...}]``,
``["events", slot, stream, samples_received, [event, ...]]``, ``["steps", [[frames, seconds], ...]]`` (the timing of
every engine step since the last message, sent to every worker, whose step listeners, e.g. the real-time monitor,
get them), ``["beat"]``. Events: ``[0, frame, token, pauses,
buffered_samples]`` (StepOutput), ``[1, frames]`` (StreamEnd), ``[2, reason]`` (StreamFailed).

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
from dataclasses import asdict, dataclass, field
from typing import Callable

import msgpack
import numpy as np
import zmq

from kyutai_stt.serve.metrics import name_os_thread
from kyutai_stt.engine.kyutai.engine import (Engine, EngineEvent, EngineStats, EngineStopped, NoFreeSlot, StepOutput,
    StreamClosed, StreamEnd, StreamFailed, StreamHandle)

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


def _pack_events(events: list[EngineEvent]) -> list:
    out = []
    for e in events:
        if isinstance(e, StepOutput):
            out.append([0, e.frame, e.token, list(e.pauses) if e.pauses is not None else None, e.buffered_samples])
        elif isinstance(e, StreamEnd):
            out.append([1, e.frames])
        else:
            out.append([2, e.reason])
    return out


def _unpack_events(items: list) -> list[EngineEvent]:
    out: list[EngineEvent] = []
    for item in items:
        if item[0] == 0:
            out.append(StepOutput(item[1], item[2], tuple(item[3]) if item[3] is not None else None, item[4]))
        elif item[0] == 1:
            out.append(StreamEnd(item[1]))
        else:
            out.append(StreamFailed(item[1]))
    return out


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
        self._steps: deque[tuple[int, float]] = deque()  # (frames, seconds) of steps not yet sent to the workers
        engine.add_step_listener(self._on_step)
        self._routes: dict[tuple[int, int], _Route] = {}
        self._workers: dict[str, float] = {}  # worker id -> last time heard
        self._stopping = threading.Event()
        model = engine.model
        self._info = {
            "name": model.name, "batch_size": engine.batch_size, "frames_per_step": engine.frames_per_step,
            "flush_frames": engine.flush_frames, "delay_frames": model.delay_frames,
            "prefix_frames": model.prefix_frames, "random_weights": model.random_weights,
            "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
            "tokenizer": model.tokenizer.serialized_model_proto(),
        }

    def stop(self) -> None:
        self._stopping.set()
        self._waker.wake()

    # engine worker thread
    def _on_step(self, frames: int, seconds: float) -> None:
        self._steps.append((frames, seconds))  # sent with the step's events (the engine calls listeners first)
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
                        self._handle(msgpack.unpackb(message))
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

    def _reply(self, worker: str, items: list) -> None:
        self._router.send_multipart([worker.encode(), msgpack.packb(items)])

    def _beat(self, now: float) -> None:
        for worker, heard in list(self._workers.items()):
            if now - heard > DEAD_AFTER_SECONDS:
                log.warning("worker %s silent for %.1f s: dropping its streams", worker, now - heard)
                self._drop_worker(worker)
            else:
                self._reply(worker, [["beat"]])

    def _drop_worker(self, worker: str) -> None:
        self._workers.pop(worker, None)
        for key, route in list(self._routes.items()):
            if route.worker == worker:
                self.engine.abort(route.handle)
                del self._routes[key]

    def _handle(self, message: list) -> None:
        worker, commands = message[0], message[1:]
        if worker == LAUNCHER_ID:
            for command in commands:
                if command[0] == "gone":
                    log.warning("worker %s exited: freeing its %d slot(s)", command[1],
                                sum(r.worker == command[1] for r in self._routes.values()))
                    self._drop_worker(command[1])
            return
        replies, unknown = [], set()
        self._workers[worker] = time.monotonic()
        for command in commands:
            kind = command[0]
            if kind == "push":
                route = self._routes.get((command[1], command[2]))
                if route is not None:
                    pcm = np.frombuffer(command[3], np.float32)
                    route.received += pcm.size
                    try:
                        self.engine.push(route.handle, pcm)
                    except StreamClosed:
                        pass  # the stream failed or ended; its last events are on their way
                elif (command[1], command[2]) not in unknown:
                    # dropped here (its worker was silent too long, or it failed): say so, or it waits forever
                    unknown.add((command[1], command[2]))
                    replies.append(["events", command[1], command[2], 0, [[2, "the stream was dropped"]]])
            elif kind == "open":
                replies.append(self._open(worker, command[1]))
            elif kind == "close":
                route = self._routes.get((command[1], command[2]))
                if route is not None:
                    self.engine.close(route.handle)
            elif kind == "abort":
                route = self._routes.pop((command[1], command[2]), None)
                if route is not None:
                    self.engine.abort(route.handle)
            elif kind == "stats":
                replies.append(["stats", command[1], asdict(self.engine.stats())])
            elif kind == "hello":
                replies.append(["info", self._info])
            elif kind == "bye":
                self._drop_worker(worker)
        if replies:
            self._reply(worker, replies)

    def _open(self, worker: str, request: int) -> list:
        route = _Route(worker)
        try:
            handle = self.engine.open(self._sink_for(route))
        except NoFreeSlot as exc:
            return ["refused", request, "full", str(exc)]
        except EngineStopped as exc:
            return ["refused", request, "stopped", str(exc)]
        route.handle = handle
        self._routes[(handle.slot, handle.stream_id)] = route
        return ["opened", request, handle.slot, handle.stream_id]

    def _send_events(self) -> None:
        """Everything the engine delivered since the last call: one message per worker."""
        by_worker: dict[str, list] = {}
        while self._outbox:
            route, events = self._outbox.popleft()
            handle = route.handle
            if handle is None:
                continue
            key = (handle.slot, handle.stream_id)
            if any(not isinstance(e, StepOutput) for e in events):
                self._routes.pop(key, None)  # ended or failed: the engine freed the slot
            by_worker.setdefault(route.worker, []).append(
                ["events", handle.slot, handle.stream_id, route.received, _pack_events(events)])
        # After the events: the engine calls step listeners before it delivers, so the timings of every step whose
        # events were just taken are queued by now, and go first (a worker's monitor sees the step before its end).
        steps = []
        while self._steps:
            steps.append(list(self._steps.popleft()))
        if steps:  # every worker: a worker with no stream still answers /status for the whole server
            for worker in self._workers:
                by_worker.setdefault(worker, []).insert(0, ["steps", steps])
        for worker, items in by_worker.items():
            if worker in self._workers:
                self._reply(worker, items)


# ====================================================================================== worker process side
class RemoteModel:
    """What a worker needs of the model: the tokenizer (loaded alone, from the engine's copy) and its timing
    constants and description. The weights stay in the engine process."""

    def __init__(self, info: dict):
        import sentencepiece
        import torch

        self.name = info["name"]
        self.tokenizer = sentencepiece.SentencePieceProcessor(model_proto=info["tokenizer"])
        self.delay_frames: int = info["delay_frames"]
        self.prefix_frames: int = info["prefix_frames"]
        self.random_weights: bool = info["random_weights"]
        self.device = torch.device(info["device"])
        self.dtype = getattr(torch, info["dtype"])


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
    reply: list | None = None
    sink: Callable[[list[EngineEvent]], None] | None = None


class EngineClient:
    """The ``Engine`` stream interface, served by an engine in another process.

    ``open`` and ``stats`` wait for the engine's answer (at most ``REQUEST_TIMEOUT_SECONDS``; an open takes a
    round trip, well under a millisecond over ``ipc://`` when the engine is idle); ``push``, ``close`` and
    ``abort`` are queued and sent in order by the I/O thread. Sinks are called on the I/O thread, as the engine
    calls them on its worker thread. ``buffered_samples`` is computed here from the engine's last report plus what
    was sent since, so backpressure needs no round trip.
    """

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
        self._outbox: deque[list] = deque()
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._pending: dict[int, _Pending] = {}
        self._requests = itertools.count(1)
        self._lock = threading.Lock()  # guards _streams and _pending between the caller and the I/O thread
        self._step_listeners: list[Callable[[int, float], None]] = []
        self._info: dict | None = None
        self._info_ready = threading.Event()
        self._last_heard = time.monotonic()
        self._engine_alive = True
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="stt-ipc-client", daemon=True)
        self._thread.start()
        if not self._info_ready.wait(connect_timeout):
            self.stop()
            raise EngineStopped(f"no answer from the engine process within {connect_timeout:g} s")
        info = self._info
        self.model = RemoteModel(info)
        self.batch_size: int = info["batch_size"]
        self.frames_per_step: int = info["frames_per_step"]
        self.flush_frames: int = info["flush_frames"]

    counts_step_metrics = False  # the engine process records the step metrics once, for the whole server

    # ---------------------------------------------------------------- Engine interface
    @property
    def alive(self) -> bool:
        return self._engine_alive and not self._stopping

    def open(self, sink, timeout: float = 0.0) -> StreamHandle:
        """``Engine.open`` across processes: the engine process allocates the slot (admission stays global).
        With ``timeout``, a full engine is asked again every ``OPEN_RETRY_SECONDS`` until then (the engine
        process never blocks its loop on one worker's wait); the caller is a waiting thread (``slots``)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            reply = self._request(["open"], sink)
            if reply[0] == "opened":
                return StreamHandle(reply[2], reply[3])
            if reply[2] != "full":
                raise EngineStopped(reply[3])
            if time.monotonic() + OPEN_RETRY_SECONDS > deadline:
                raise NoFreeSlot(reply[3])
            time.sleep(OPEN_RETRY_SECONDS)

    def push(self, handle: StreamHandle, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if not pcm.size:
            return
        stream = self._streams.get((handle.slot, handle.stream_id))
        if stream is None or stream.closing:
            raise StreamClosed("stream is closed")
        stream.sent += pcm.size
        self._send(["push", handle.slot, handle.stream_id, pcm.tobytes()])

    def close(self, handle: StreamHandle) -> None:
        stream = self._streams.get((handle.slot, handle.stream_id))
        if stream is not None and not stream.closing:
            stream.closing = True
            self._send(["close", handle.slot, handle.stream_id])

    def abort(self, handle: StreamHandle) -> None:
        with self._lock:
            stream = self._streams.pop((handle.slot, handle.stream_id), None)
        if stream is not None:
            self._send(["abort", handle.slot, handle.stream_id])

    def buffered_samples(self, handle: StreamHandle) -> int:
        stream = self._streams.get((handle.slot, handle.stream_id))
        if stream is None:
            return 0
        return max(0, stream.reported + stream.sent - stream.received_at_report)

    def stats(self) -> EngineStats:
        if self.alive:
            try:
                reply = self._request(["stats"], timeout=2.0)
                stats = EngineStats(**reply[2])
                stats.worker_alive = stats.worker_alive and self.alive
                return stats
            except EngineStopped:
                pass
        return EngineStats(self.batch_size, 0, 0, 0, False, 0.0, 0)

    def add_step_listener(self, listener: Callable[[int, float], None]) -> None:
        """Call ``listener(frames, seconds)`` for every engine step, on the I/O thread, as the engine process
        reports them (with the step's events): the real-time monitor of each worker. The step metrics are not
        counted here but in the engine process (``counts_step_metrics``), or /metrics would sum them N+1 times."""
        self._step_listeners.append(listener)

    def stop(self) -> None:
        if self._stopping:
            return
        self._send(["bye"])  # the I/O thread sends what is queued before it closes
        self._stopping = True
        self._waker.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    # ---------------------------------------------------------------- internals
    def _send(self, command: list) -> None:
        self._outbox.append(command)
        self._waker.wake()

    def _request(self, command: list, sink=None, timeout: float = REQUEST_TIMEOUT_SECONDS) -> list:
        request = next(self._requests)
        pending = _Pending(sink=sink)
        with self._lock:
            self._pending[request] = pending
        self._send(command + [request])
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(request, None)
            raise EngineStopped(f"no answer from the engine process within {timeout:g} s")
        if pending.reply is None:
            raise EngineStopped("the engine is not running")
        return pending.reply

    def _run(self) -> None:
        name_os_thread("stt-ipc-client")
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._waker.read_fd, zmq.POLLIN)
        next_beat = 0.0
        try:
            while not self._stopping:
                now = time.monotonic()
                if self._info is None and now >= next_beat:
                    self._outbox.appendleft(["hello"])  # repeated until the engine's ROUTER knows this worker
                    next_beat = now + 0.2
                elif now >= next_beat:
                    self._outbox.append(["beat"])
                    next_beat = now + BEAT_SECONDS
                if self._outbox:
                    commands = [self.worker_id]
                    while self._outbox:
                        commands.append(self._outbox.popleft())
                    self._push.send(msgpack.packb(commands))
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
                        for item in msgpack.unpackb(message):
                            self._on_item(item)
                if self._info is not None and self._engine_alive and \
                        time.monotonic() - self._last_heard > DEAD_AFTER_SECONDS:
                    self._engine_gone()
        finally:
            if self._outbox:
                with contextlib.suppress(zmq.ZMQError):
                    self._push.send(msgpack.packb([self.worker_id, *self._outbox]))
            self._push.close(linger=200)
            self._dealer.close(linger=0)
            self._ctx.term()
            self._waker.close()

    def _on_item(self, item: list) -> None:
        kind = item[0]
        if kind == "steps":
            for frames, seconds in item[1]:
                for listener in self._step_listeners:
                    listener(frames, seconds)
        elif kind == "events":
            key = (item[1], item[2])
            events = _unpack_events(item[4])
            with self._lock:
                stream = self._streams.get(key)
                if stream is not None and any(not isinstance(e, StepOutput) for e in events):
                    del self._streams[key]
            if stream is None:
                return  # aborted here already
            last = next((e for e in reversed(events) if isinstance(e, StepOutput)), None)
            if last is not None:
                stream.reported, stream.received_at_report = last.buffered_samples, item[3]
            Engine._deliver(stream.sink, events)
        elif kind in ("opened", "refused", "stats"):
            with self._lock:
                pending = self._pending.pop(item[1], None)
                if pending is not None and kind == "opened":
                    prefix = self._info["prefix_frames"] * 1920
                    self._streams[(item[2], item[3])] = _Stream(pending.sink, reported=prefix)
            if pending is None:
                if kind == "opened":  # the caller gave up waiting: give the slot back
                    self._outbox.append(["abort", item[2], item[3]])
                return
            pending.reply = item
            pending.done.set()
        elif kind == "info":
            if self._info is None:
                self._info = item[1]
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
            Engine._deliver(stream.sink, [StreamFailed("the engine stopped")])
