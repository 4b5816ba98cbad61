"""The batched engine: one Mimi and one LMGen serve every stream, one batched step at a time.

The engine knows nothing of sockets or asyncio. A stream takes a slot (``open``), feeds it 24 kHz float PCM of any
length (``push``), and ends it (``close``, which flushes) or drops it (``abort``). A dedicated worker thread runs
the steps; each step encodes one 80 ms frame with Mimi and runs one LM step for every slot that has a frame
waiting, while every other slot is paused with moshi's exec mask, so its state is exactly as if the step never
happened. Results go back through each stream's ``sink`` callback, called on the worker thread.

Conventions (equal to ``reference.reference_outputs``, a plain single-stream loop):
- The LM's very first step after a reset replaces its whole input by the initial tokens, so the audio it is
  given is never seen. Like ``moshi.run_inference`` we give that step to the LM once more before the first frame
  (the "init step"); it needs no audio, so it runs as soon as the slot opens and costs the stream no latency.
- A partial last frame is zero-padded; after it, ``delay + flush_seconds`` of silence is fed so the last word,
  which lags the audio by the model's delay, comes out. Models with a silence prefix get it before the audio.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from moshi.models import LMGen

from .checkpoint import FRAME_RATE, FRAME_SIZE, SttModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one LM step produced for one stream."""

    frame: int  # index of the audio frame of this stream (silence prefix included) that produced the token
    token: int  # text token: 3 padding, 0 word boundary, >3 a piece
    pauses: tuple[float, ...] | None  # per VAD head, probability of no voice activity; None without heads
    buffered_samples: int  # audio of this stream waiting in the engine after this step


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The stream was flushed: every output for its audio has been delivered."""

    frames: int


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """The engine could not process this stream; no more outputs will come."""

    reason: str


EngineEvent = StepOutput | StreamEnd | StreamFailed
Sink = Callable[[list[EngineEvent]], None]


class NoFreeSlot(RuntimeError):
    """Every slot is in use."""


class EngineStopped(RuntimeError):
    """The engine is not running (stopped, or its worker died)."""


@dataclass(eq=False)
class _Slot:
    index: int
    stream_id: int = 0
    sink: Sink | None = None
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    needs_reset: bool = False
    needs_init: bool = False
    closing: bool = False
    flush_frames_left: int = 0
    frames_done: int = 0

    @property
    def in_use(self) -> bool:
        return self.sink is not None

    def has_frame(self) -> bool:
        return len(self.buffer) >= FRAME_SIZE or (self.closing and (len(self.buffer) > 0 or self.flush_frames_left > 0))

    def ready(self) -> bool:
        return self.in_use and (self.needs_init or self.has_frame())

    def take_frame(self) -> np.ndarray:
        if len(self.buffer) >= FRAME_SIZE:
            frame, self.buffer = self.buffer[:FRAME_SIZE], self.buffer[FRAME_SIZE:]
            return frame
        if len(self.buffer) > 0:  # the partial last frame, zero-padded
            frame = np.zeros(FRAME_SIZE, np.float32)
            frame[: len(self.buffer)] = self.buffer
            self.buffer = np.zeros(0, np.float32)
            return frame
        self.flush_frames_left -= 1
        return np.zeros(FRAME_SIZE, np.float32)

    def done(self) -> bool:
        return self.closing and len(self.buffer) == 0 and self.flush_frames_left <= 0


@dataclass
class StreamHandle:
    slot: int
    stream_id: int


@dataclass
class EngineStats:
    slots_total: int
    slots_in_use: int
    steps: int
    frames: int
    worker_alive: bool
    last_step_seconds: float
    failures: int


def flush_frame_count(model: SttModel, flush_seconds: float) -> int:
    """Silent frames fed after the audio: the model's delay plus ``flush_seconds`` (at least one frame)."""
    return model.delay_frames + max(1, math.ceil(flush_seconds * FRAME_RATE - 1e-9))


class Engine:
    def __init__(self, model: SttModel, slots: int, flush_seconds: float = 0.5):
        self.model = model
        self.batch_size = slots
        self.flush_frames = flush_frame_count(model, flush_seconds)
        self._step_listeners: list[Callable[[int, float], None]] = []  # (frames in the step, seconds)
        self._slots = [_Slot(i) for i in range(slots)]
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._steps = 0
        self._frames = 0
        self._failures = 0
        self._last_step_seconds = 0.0
        self.fault_injector: Callable[[], None] | None = None  # tests: raise inside a step
        device = model.device
        self._lm_gen = LMGen(model.lm, temp=0.0, temp_text=0.0)
        # moshi keeps streaming state on the modules; stop() leaves streaming mode so the model can be reused.
        self._streaming = ExitStack()
        self._streaming.enter_context(model.mimi.streaming(slots))
        self._streaming.enter_context(self._lm_gen.streaming(slots))
        self._zero_codes = torch.zeros((slots, model.mimi.num_codebooks, 1), dtype=torch.long, device=device)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "Engine":
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="kyutai-stt-engine", daemon=True)
            self._worker.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30)
        if self._worker is None or not self._worker.is_alive():
            self._streaming.close()

    def add_step_listener(self, listener: Callable[[int, float], None]) -> None:
        """Call ``listener(frames, seconds)`` after every step, on the worker thread (metrics, benchmarks)."""
        self._step_listeners.append(listener)

    @property
    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive() and not self._stopping

    def warmup(self, steps: int = 3) -> None:
        """Run full-batch steps on silence (compiles CUDA graphs) before any stream arrives."""
        with self._cond:
            if any(s.in_use for s in self._slots):
                raise RuntimeError("warm up before serving streams")
        all_on = torch.ones(self.batch_size, dtype=torch.bool, device=self.model.device)
        pcm = torch.zeros((self.batch_size, 1, FRAME_SIZE), device=self.model.device)
        with torch.no_grad():
            for _ in range(steps):
                self.model.mimi.set_exec_mask(all_on)
                self._lm_gen.set_exec_mask(all_on)
                codes = self.model.mimi.encode(pcm)
                self._lm_gen.step_with_extra_heads(codes)
            self.model.mimi.reset_streaming(all_on)
            self._lm_gen.reset_streaming(all_on)

    # ---------------------------------------------------------------- stream API (any thread)
    def open(self, sink: Sink) -> StreamHandle:
        with self._cond:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            slot = next((s for s in self._slots if not s.in_use), None)
            if slot is None:
                raise NoFreeSlot(f"all {self.batch_size} slots are in use")
            slot.stream_id = next(self._ids)
            slot.sink = sink
            slot.buffer = np.zeros(self.model.prefix_frames * FRAME_SIZE, np.float32)
            slot.needs_reset = slot.needs_init = True
            slot.closing = False
            slot.flush_frames_left = self.flush_frames
            slot.frames_done = 0
            self._cond.notify_all()
            return StreamHandle(slot.index, slot.stream_id)

    def _own(self, handle: StreamHandle) -> _Slot | None:
        slot = self._slots[handle.slot]
        return slot if slot.in_use and slot.stream_id == handle.stream_id else None

    def push(self, handle: StreamHandle, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if not pcm.size:
            return
        with self._cond:
            slot = self._own(handle)
            if slot is None or slot.closing:
                raise RuntimeError("stream is closed")
            slot.buffer = np.concatenate([slot.buffer, pcm])
            if len(slot.buffer) >= FRAME_SIZE:
                self._cond.notify_all()

    def close(self, handle: StreamHandle) -> None:
        """No more audio: flush, deliver the last outputs and StreamEnd, then free the slot."""
        with self._cond:
            slot = self._own(handle)
            if slot is not None and not slot.closing:
                slot.closing = True
                self._cond.notify_all()

    def abort(self, handle: StreamHandle) -> None:
        """Drop the stream now (client gone): no more outputs, the slot is free at once."""
        with self._cond:
            slot = self._own(handle)
            if slot is not None:
                self._release(slot)

    def buffered_samples(self, handle: StreamHandle) -> int:
        with self._cond:
            slot = self._own(handle)
            return len(slot.buffer) if slot is not None else 0

    def stats(self) -> EngineStats:
        with self._cond:
            used = sum(s.in_use for s in self._slots)
        return EngineStats(self.batch_size, used, self._steps, self._frames, self.alive,
                           self._last_step_seconds, self._failures)

    def _release(self, slot: _Slot) -> None:
        slot.sink = None
        slot.buffer = np.zeros(0, np.float32)
        slot.closing = False

    # ---------------------------------------------------------------- worker
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not any(s.ready() for s in self._slots):
                        self._cond.wait()
                    if self._stopping:
                        break
                    plan = self._plan()
                self._execute(plan)
        except BaseException:  # pragma: no cover - reported by /status as unhealthy
            log.exception("engine worker died")
            raise
        finally:
            with self._cond:
                for slot in self._slots:
                    if slot.in_use and slot.sink is not None:
                        self._deliver(slot.sink, [StreamFailed("the engine stopped")])
                        self._release(slot)

    def _plan(self):
        """Under the lock: decide what each slot does this step (plain data, no torch)."""
        reset = np.zeros(self.batch_size, bool)
        init = np.zeros(self.batch_size, bool)
        audio = np.zeros(self.batch_size, bool)
        pcm = np.zeros((self.batch_size, FRAME_SIZE), np.float32)
        for slot in self._slots:
            if not slot.ready():
                continue
            if slot.needs_reset:
                reset[slot.index] = True
                slot.needs_reset = False
            if slot.needs_init:
                init[slot.index] = True
                slot.needs_init = False
            else:
                pcm[slot.index] = slot.take_frame()
                audio[slot.index] = True
        targets = {s.index: (s, s.stream_id, s.sink) for s in self._slots if reset[s.index] or init[s.index] or audio[s.index]}
        return reset, init, audio, pcm, targets

    @torch.no_grad()
    def _execute(self, plan) -> None:
        reset, init, audio, pcm, targets = plan
        start = time.perf_counter()
        device = self.model.device
        try:
            if self.fault_injector is not None:
                self.fault_injector()
            if reset.any():
                mask = torch.from_numpy(reset).to(device)
                self.model.mimi.reset_streaming(mask)
                self._lm_gen.reset_streaming(mask)
            lm_mask = torch.from_numpy(init | audio).to(device)
            if audio.any():
                self.model.mimi.set_exec_mask(torch.from_numpy(audio).to(device))
                batch = torch.from_numpy(pcm).to(device, non_blocking=True)[:, None, :]
                codes = self.model.mimi.encode(batch)
            else:
                codes = self._zero_codes
            self._lm_gen.set_exec_mask(lm_mask)
            result = self._lm_gen.step_with_extra_heads(codes)
            assert result is not None  # no audio delays in STT models, so every step returns tokens
            tokens_t, heads = result
            tokens = tokens_t[:, 0, 0].cpu().numpy()  # one host sync per step, not one per slot
            pauses = torch.stack([h[:, 0, 0] for h in heads], dim=1).float().cpu().numpy() if heads else None
        except Exception as exc:
            self._fail_step(targets, exc)
            return
        elapsed = time.perf_counter() - start
        self._steps += 1
        self._frames += int(audio.sum())
        self._last_step_seconds = elapsed
        for listener in self._step_listeners:
            listener(int(audio.sum()), elapsed)
        deliveries = []
        with self._cond:
            for index, (slot, stream_id, sink) in targets.items():
                if not audio[index] or slot.stream_id != stream_id or not slot.in_use:
                    continue  # init steps produce nothing; aborted streams get nothing
                out = StepOutput(
                    frame=slot.frames_done,
                    token=int(tokens[index]),
                    pauses=tuple(float(p) for p in pauses[index]) if pauses is not None else None,
                    buffered_samples=len(slot.buffer),
                )
                slot.frames_done += 1
                events: list[EngineEvent] = [out]
                if slot.done():
                    events.append(StreamEnd(slot.frames_done))
                    self._release(slot)
                deliveries.append((sink, events))
        for sink, events in deliveries:
            self._deliver(sink, events)

    def _fail_step(self, targets, exc: Exception) -> None:
        """A step raised: fail the streams it carried, and give their slots back fresh."""
        log.exception("engine step failed; failing %d stream(s)", len(targets))
        self._failures += 1
        deliveries = []
        with self._cond:
            for index, (slot, stream_id, sink) in targets.items():
                if slot.in_use and slot.stream_id == stream_id:
                    self._release(slot)
                    deliveries.append(sink)
                # the slot's state may be half-updated: the next stream in it is reset anyway (open sets
                # needs_reset), so nothing else to repair here.
        for sink in deliveries:
            self._deliver(sink, [StreamFailed(f"internal error while transcribing: {type(exc).__name__}")])

    @staticmethod
    def _deliver(sink: Sink, events: list[EngineEvent]) -> None:
        try:
            sink(events)
        except Exception:  # a broken consumer must never stop the engine
            log.exception("stream sink raised")
