"""The batched Kyutai engine (``engine.contract.Engine``): one Mimi and one LMGen serve every stream, one batched
step at a time.

The engine knows nothing of sockets or asyncio. A stream takes a slot (``open``), feeds it 24 kHz float PCM of any
length (``push``), and ends it (``close``, which flushes) or drops it (``abort``). A dedicated worker thread runs
the steps; each step encodes one 80 ms frame with Mimi and runs one LM step for every slot that has a frame
waiting, while every other slot is paused with moshi's exec mask, so its state is exactly as if the step never
happened. Results go back through each stream's ``sink`` callback, called on the worker thread.

Conventions (equal to ``reference.reference_outputs``, a plain single-stream loop):
- The LM's very first step after a reset replaces its whole input by the initial tokens, so the audio it is
  given is never seen. Like ``moshi.run_inference`` we give that step to the LM once more before the first frame
  (the "init step"); it needs no audio, so it runs as soon as the slot opens and costs the stream no latency.
- A partial last frame is zero-padded; after it, the flush (``flush_frame_count``: the model's delay plus one frame
  by default) is fed as silence so the last word, which lags the audio by the model's delay, comes out. A mid-stream
  finalize (``stream.flush``) feeds the same flush. Models with a silence prefix get it before the audio.
- Mimi's encoder attention always sees its full 10 s context, whether it is given one frame per call or several
  (``attention_cache``); moshi's default cache drops a few of the oldest keys for multi-step calls.
- Mimi is always called with a multiple of ``frames_per_step`` frames of a stream, from a multiple of
  ``frames_per_step`` of its frames. A step carries ``frames_per_step`` frames per stream, or more, up to
  ``max_frames_per_step``, when every stream it steps has that many waiting (a finalize's flush, a backlog under
  load): one Mimi call then does the work of several, at a fraction of their cost (Mimi's per-call cost
  dominates on the CPU). That is exact only where Mimi's codes do not depend on the frames per call: on the CPU in
  the batch-invariant mode, for multiples of 2 frames and a given attention cache (measured bit for bit, 11.5 s
  of speech; a 1-frame call differs), so ``max_frames_per_call`` allows it there only.

The lanes (``lane``): small batches of 1, 2, 4, ... up to ``lane_slots`` rows beside the main batch. When every
stream with frames to step fits in one, the step runs in the smallest that fits and computes only its rows, not all
``slots``: one client on a 4-slot CPU server steps in about 45 % of the time, and a finalize's flush, when the other
streams are waiting for audio, goes through in small steps. A stream's state moves into a lane row (and stays there
while it keeps fitting) and back to its slot's row before any main step or a step in another lane.

Neighbour invariance: a row's result must not depend on its slot, on the other rows, or on the batch it is stepped
in (the main batch or a lane). Without lanes every step runs the full batch of ``slots`` rows, so shapes never
change with the load, and on the CPU that holds bit for bit once MKL runs in strict reproducible mode
(``batch_invariant.mkl``). Lanes change a stream's batch size with the load, so they need the batch-invariant mode
(``batch_invariant``, setting ``KYUTAI_STT_BATCH_INVARIANT``, on by default): on CUDA its kernels; on the CPU
oneDNN's convolutions off, short ones as one matrix product and matrix products of at least 4 rows. The reference
loop uses the same mode.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from moshi.models import LMGen
from moshi.modules.streaming import StreamingModule

from kyutai_stt.audio.constants import FRAME_RATE, FRAME_SIZE
from kyutai_stt.engine import batch_invariant
# the contract's events and errors, also importable from here (the engine raises and delivers them)
from kyutai_stt.engine.contract import (ActiveStreams, ContextReset, DecodingOptions, EngineEvent, EngineStats,
    EngineStopped, NoFreeSlot, Sink, StepListener, StepOutput, StepTiming, StreamClosed, StreamEnd, StreamFailed,
    StreamHandle, call_sink)
from kyutai_stt.engine.kyutai.attention_cache import fit_encoder_attention
from kyutai_stt.engine.kyutai.checkpoint import SttModel
from kyutai_stt.engine.kyutai.decoding import SlotDecoding, keyterm_trie
from kyutai_stt.engine.kyutai.info import describe
from kyutai_stt.engine.kyutai.lane import Lane

log = logging.getLogger(__name__)


class _PartClock:
    """Splits a step into parts for ``StepTiming``; exists only while a timing listener is registered."""

    def __init__(self, device: torch.device, start: float):
        self._cuda = device if device.type == "cuda" else None
        self._last = start
        self.parts: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        t = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + t - self._last
        self._last = t


class _AudioQueue:
    """A stream's audio waiting for the engine, kept as the chunks that were pushed: a push costs its own size,
    never a copy of the backlog (a client far ahead of the engine would otherwise cost quadratic time)."""

    def __init__(self, pcm: np.ndarray | None = None):
        self._chunks: deque[np.ndarray] = deque()
        self._offset = 0  # samples of the first chunk already taken
        self._size = 0
        if pcm is not None:
            self.push(pcm)

    def __len__(self) -> int:
        return self._size

    def push(self, pcm: np.ndarray) -> None:
        if pcm.size:
            self._chunks.append(pcm)
            self._size += pcm.size

    def take_into(self, out: np.ndarray) -> None:
        """Fill ``out`` with the next samples, zero-padded when fewer are left."""
        count, filled = out.size, 0
        while filled < count and self._chunks:
            chunk = self._chunks[0]
            part = chunk[self._offset:self._offset + count - filled]
            out[filled:filled + part.size] = part
            filled += part.size
            self._offset += part.size
            if self._offset == chunk.size:
                self._chunks.popleft()
                self._offset = 0
        out[filled:] = 0
        self._size -= filled


@dataclass(eq=False)
class _Slot:
    index: int
    stream_id: int = 0
    sink: Sink | None = None
    buffer: _AudioQueue = field(default_factory=_AudioQueue)
    needs_reset: bool = False
    needs_init: bool = False
    closing: bool = False
    flush_frames_left: int = 0
    frames_done: int = 0
    # how the stream decodes: (options, seed, keyterm trie edges), given to the device state at its reset
    decoding: tuple = (DecodingOptions(), None, [])
    needs_context_reset: bool = False  # Engine.reset: reset the LM context before the next audio step
    frames_taken: int = 0  # frames planned so far (frames_done lags it while a step runs)
    changes: list = field(default_factory=list)  # Engine.reconfigure: (frame, decoding) in frame order
    lane: int = -1  # the lane holding the slot's state (-1: the main batch)
    lane_row: int = -1  # its row there
    awaited: int = 0  # Engine.expedite: a client awaits the outputs of the frames before this one (a finalize)

    @property
    def in_use(self) -> bool:
        return self.sink is not None

    def frames_available(self) -> int:
        """Frames this slot could step now: whole buffered frames, plus, once closing, the padded last one and
        the flush."""
        whole = len(self.buffer) // FRAME_SIZE
        if not self.closing:
            return whole
        return -(-len(self.buffer) // FRAME_SIZE) + max(0, self.flush_frames_left)

    def ready(self, frames_per_step: int) -> bool:
        """Has frames to step now (in the lane or the main batch)."""
        if not self.in_use:
            return False
        available = self.frames_available()
        return self.needs_init or available >= frames_per_step or (self.closing and available > 0)

    def take_frame(self, out: np.ndarray) -> None:
        """Write the next frame into ``out`` (a row of the step's audio batch)."""
        if len(self.buffer) == 0:
            self.flush_frames_left -= 1  # the buffer is empty only once closing: a frame of flush silence
        self.buffer.take_into(out)  # the partial last frame comes zero-padded

    def lane_ready(self, frames_per_step: int) -> bool:
        """Can step in the lane now: a whole step of frames (a closing stream's shorter last step, padded, runs in
        the main batch, as do reset and init steps), so a stream's Mimi calls are the same in either batch."""
        return (self.in_use and not self.needs_reset and not self.needs_init
                and self.frames_available() >= frames_per_step)

    def done(self) -> bool:
        return self.closing and len(self.buffer) == 0 and self.flush_frames_left <= 0

    def ends_unstepped(self) -> bool:
        """Closed with nothing left to step and no step of it in flight (a close without a flush right after the
        last step): no step will deliver its ``StreamEnd``, so the worker does."""
        return self.in_use and self.done() and self.frames_taken == self.frames_done

    def awaited_frames(self) -> int:
        """Frames still to step before a finalize's words are out (``Engine.expedite``); 0 when none is awaited."""
        return max(0, self.awaited - self.frames_taken)


@dataclass
class _StepPlan:
    """What one engine step does, per slot (plain data, decided under the lock)."""

    reset: np.ndarray  # bool [B]: reset the slot's state first
    init: np.ndarray  # bool [B]: the slot's LM init step (no audio)
    audio: np.ndarray  # bool [B]: the slot steps the step's ``frames`` frames of pcm
    pcm: np.ndarray  # float32 [B, frames * FRAME_SIZE]
    deliver: np.ndarray  # int [B]: how many of those frames are the stream's (the rest pads the last step)
    context_reset: np.ndarray  # bool [B]: reset the LM context (not Mimi's), then an init step, then the audio
    targets: dict  # slot index -> (slot, stream id, sink) for every slot touched
    configure: dict = field(default_factory=dict)  # slot index -> its new stream's decoding (at its reset)
    reconfigure: dict = field(default_factory=dict)  # frame j of the step -> [(slot index, decoding, LM step)]
    plan_seconds: float = 0.0  # measured only for timing listeners
    # a step in lane ``lane`` (-1: the main batch): the arrays above are per lane row. Before the step, ``leave``
    # rows go back to their slots' rows of the main batch, then ``enter`` slots are copied into their lane rows
    lane: int = -1
    enter: list = field(default_factory=list)  # (slot index, lane row)
    leave: list = field(default_factory=list)  # (lane, lane row, slot index)

    @property
    def frames(self) -> int:
        """Frames each stepping row carries this step (a multiple of ``frames_per_step``)."""
        return self.pcm.shape[1] // FRAME_SIZE

    @classmethod
    def empty(cls, rows: int, frames: int, **fields) -> "_StepPlan":
        """A step of ``rows`` rows (the main batch's or the lane's) where no row does anything yet."""
        return cls(np.zeros(rows, bool), np.zeros(rows, bool), np.zeros(rows, bool),
                   np.zeros((rows, frames * FRAME_SIZE), np.float32), np.zeros(rows, int),
                   np.zeros(rows, bool), {}, **fields)


def default_frames_per_step(device: torch.device) -> int:
    """1 on GPU; 2 on CPU, where Mimi's fixed per-call cost dominates (same results, 80 ms more latency)."""
    return 1 if device.type == "cuda" else 2


MAX_FRAMES_PER_CALL = 16  # the largest Mimi call of a stream where calls may be larger than a step (1.28 s)


def bigger_steps_are_exact(device: torch.device, batch_invariant: bool, frames_per_step: int) -> bool:
    """Whether Mimi's codes are the same for calls of any multiple of ``frames_per_step`` frames (given the same
    attention caches): on the CPU in batch-invariant mode with 2 or more frames per step (measured bit for bit: 2 to
    16 frames per call, 11.5 s of speech). Not on the CPU at 1 frame per call (other bits than 2), not measured on
    CUDA."""
    return device.type == "cpu" and batch_invariant and frames_per_step >= 2


def max_frames_per_call(device: torch.device, batch_invariant: bool, frames_per_step: int) -> int:
    """The most frames of a stream Mimi may take in one call (the largest ``max_frames_per_step`` allowed): the
    largest multiple of ``frames_per_step`` up to ``MAX_FRAMES_PER_CALL`` where bigger steps are exact, else
    ``frames_per_step``."""
    k = frames_per_step
    return MAX_FRAMES_PER_CALL // k * k if bigger_steps_are_exact(device, batch_invariant, k) else k


def default_max_frames_per_step(device: torch.device, batch_invariant: bool, frames_per_step: int,
                                flush_frames: int) -> int:
    """The most frames a step carries per stream when the streams it steps have them waiting: enough for a
    finalize's flush and the step of audio before it (10 frames for a 0.5 s delay at 2 frames per step: one step
    instead of five; on 2 cores 8 frames of one stream take 118 ms in one Mimi call, 250 in four), within
    ``max_frames_per_call`` (so ``frames_per_step`` where bigger steps are not exact)."""
    k = frames_per_step
    return min(max_frames_per_call(device, batch_invariant, k), -(-(flush_frames + k) // k) * k)


def encoder_frames_per_call(device: torch.device, batch_invariant: bool, frames_per_step: int) -> int:
    """The Mimi call size its attention caches are fitted for (``attention_cache``), for the engine and the
    reference alike: the codes are bitwise the same for any call size only with the same caches."""
    return MAX_FRAMES_PER_CALL if bigger_steps_are_exact(device, batch_invariant, frames_per_step) else frames_per_step


def default_lane_slots(device: torch.device, batch_invariant: bool, slots: int) -> int:
    """The largest lane's rows: 4 on GPU, where a step of a few rows should cost a fraction of a full batch's (not
    measured yet); ``slots - 1`` on CPU, where a step's cost grows with its rows (2 frames, tiny model: about 72 ms
    for 1 row, 82 for 2, 106 for 4, 138 for 6; BENCHMARKS.md). 0 (no lane) outside batch-invariant mode: a lane steps
    a stream at another batch size than the main batch, which gives the same results only when a row's results do
    not depend on the batch size."""
    if not batch_invariant:
        return 0
    return min(slots - 1, 4) if device.type == "cuda" else slots - 1


def lane_sizes(lane_slots: int) -> list[int]:
    """The lanes' rows: the powers of two below ``lane_slots``, and ``lane_slots`` (so k streams step in a batch
    of fewer than 2k rows; the extra state is less than twice the largest lane's)."""
    sizes = [1 << i for i in range(lane_slots.bit_length()) if 1 << i < lane_slots]
    return sizes + [lane_slots] if lane_slots > 0 else []


# Engine.expedite's priority (in big steps, ``max_frames_per_step`` frames): a finalize this close to its words goes
# first; a stream this far behind steps beside it anyway (never starved)
AWAITED_STEPS = 2
STARVING_STEPS = 3

MIN_FLUSH_SECONDS = 1 / FRAME_RATE  # one frame: the default and least ``flush_seconds``


def flush_frame_count(model: SttModel, flush_seconds: float = MIN_FLUSH_SECONDS) -> int:
    """Silent frames fed after the audio, at the end of a stream and at a mid-stream finalize alike: the model's
    delay plus ``flush_seconds`` (at least one frame).

    The minimum is what the words need. The text of the audio at time t comes out by t + delay, so after the last
    (zero-padded) audio frame, ``delay`` frames bring out the token of that frame; one frame more lets the word
    rule see the token after it, which closes the last word the model's own way (a padding or a boundary; if it
    is a piece, the flush closes the word anyway). A larger ``flush_seconds`` only feeds more silence."""
    return model.delay_frames + max(1, math.ceil(flush_seconds * FRAME_RATE - 1e-9))


class Engine:
    """The batched Kyutai engine; implements ``engine.contract.Engine``."""

    counts_step_metrics = True  # this process runs the steps: its step listeners feed the metrics

    def __init__(self, model: SttModel, slots: int, flush_seconds: float = MIN_FLUSH_SECONDS, frames_per_step: int = 1,
                 batch_invariant_mode: str | None = None, keyterm_boost: float = 5.0, lane_slots: int | None = None,
                 max_frames_per_step: int | None = None):
        """``batch_invariant_mode``: auto/on/off, default ``$KYUTAI_STT_BATCH_INVARIANT`` (see ``batch_invariant``).
        ``max_frames_per_step``: the most frames a step carries per stream when they are all waiting (None:
        ``default_max_frames_per_step``; more than ``frames_per_step`` only where that is exact, else refused).
        ``keyterm_boost``: what a stream's keyterms add to their pieces' text logits (``decoding``).
        ``lane_slots``: rows of the largest lane (``lane_sizes``); 0: none; None: ``default_lane_slots``."""
        self.model = model
        self.batch_size = slots
        # Frames each stream advances per step. More than 1 amortises Mimi's per-call cost (a big win on CPU)
        # at the price of (frames_per_step - 1) x 80 ms of extra latency; results are the same.
        self.frames_per_step = frames_per_step
        self.flush_frames = flush_frame_count(model, flush_seconds)
        self.info = describe(model, frames_per_step, self.flush_frames)
        self._step_listeners: list[StepListener] = []
        self._active = ActiveStreams(slots)  # the listeners' ``streams``
        self._timing_listeners: list[Callable[[StepTiming], None]] = []
        self._slots = [_Slot(i) for i in range(slots)]
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._steps = 0
        self._frames = 0
        self.lane_steps = 0  # lane steps so far (tests, benchmarks)
        self._failures = 0
        self._last_step_seconds = 0.0
        self.fault_injector: Callable[[], None] | None = None  # tests: raise inside a step
        device = model.device
        if device.type == "cpu" and batch_invariant.enable_strict_cnr() is False:
            log.warning("MKL is not in strict reproducible mode: a stream's VAD probabilities may depend on its slot")
        self.batch_invariant = batch_invariant.resolve_mode(batch_invariant_mode)
        exact_max = max_frames_per_call(device, self.batch_invariant, frames_per_step)
        self.max_frames_per_step = (default_max_frames_per_step(device, self.batch_invariant, frames_per_step,
                                                                self.flush_frames)
                                    if max_frames_per_step is None else max_frames_per_step)
        if self.max_frames_per_step % frames_per_step or not frames_per_step <= self.max_frames_per_step <= exact_max:
            raise ValueError(f"max_frames_per_step {self.max_frames_per_step}: a multiple of frames_per_step "
                             f"({frames_per_step}) up to {exact_max} here (more frames per Mimi call are exact only "
                             "on the CPU in batch-invariant mode, with 2 or more frames per step)")
        # a lone finalize's frames: in one Mimi call as large as is exact, unless the most per step was set
        self.awaited_frames_per_step = exact_max if max_frames_per_step is None else self.max_frames_per_step
        # greedy; streams that sample or boost keyterms do it in LMGen's text hooks (``decoding``)
        self._decoding = SlotDecoding(slots, model.lm.text_card, self.info.first_piece_token, device, keyterm_boost)
        self._lm_gen = LMGen(model.lm, temp=0.0, temp_text=0.0, on_text_logits_hook=self._decoding.on_text_logits,
                             on_text_hook=self._decoding.on_text_token)
        # STT only encodes: keep Mimi's decoder side out of streaming mode, so no decoder state (its transformer's
        # KV cache is 7.8 MiB per slot) is allocated for any slot.
        for part in (model.mimi.decoder, model.mimi.decoder_transformer, getattr(model.mimi, "upsample", None)):
            if isinstance(part, StreamingModule):
                part.set_streaming_detached(True)
        # Mimi encodes frames_per_step frames per call; its attention must see the same keys as frame by frame.
        fit_encoder_attention(model.mimi, encoder_frames_per_call(device, self.batch_invariant, frames_per_step))
        # moshi keeps streaming state on the modules; stop() leaves streaming mode so the model can be reused.
        self._streaming = ExitStack()
        self._streaming.enter_context(batch_invariant.enabled_for(device, "on" if self.batch_invariant else "off"))
        self._streaming.enter_context(model.mimi.streaming(slots))
        self._streaming.enter_context(self._lm_gen.streaming(slots))
        lane_slots = default_lane_slots(device, self.batch_invariant, slots) if lane_slots is None else lane_slots
        if lane_slots > 0 and not self.batch_invariant:
            raise ValueError("the lane (lane_slots > 0) steps a stream at another batch size, which gives "
                             "the same words only in batch-invariant mode: set KYUTAI_STT_BATCH_INVARIANT=on or "
                             "KYUTAI_STT_LANE_SLOTS=0")
        if lane_slots >= slots:
            raise ValueError(f"the lane must be smaller than the main batch (lane_slots {lane_slots}, slots {slots})")
        self._lanes = [Lane(model.mimi, self._lm_gen, size, SlotDecoding(size, model.lm.text_card,
                            self.info.first_piece_token, device, keyterm_boost), self._streaming)
                       for size in lane_sizes(lane_slots)]
        sizes = (slots, *(lane.size for lane in self._lanes))
        # On CUDA, audio goes to the device through one reused page-locked buffer per batch size (an asynchronous
        # copy); the previous step's copy is complete by then, since each step ends with a device-to-host sync.
        self._pinned = ({n: torch.empty((n, frames_per_step * FRAME_SIZE), pin_memory=True) for n in sizes}
                        if device.type == "cuda" else None)  # CUDA: max_frames_per_step is frames_per_step
        self._zero_codes = {n: torch.zeros((n, model.mimi.num_codebooks, 1), dtype=torch.long, device=device)
                            for n in sizes}

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

    def add_step_listener(self, listener: StepListener) -> None:
        """Call ``listener(frames, seconds, streams)`` after every step, on the worker thread (metrics, the
        real-time monitor, benchmarks)."""
        self._step_listeners.append(listener)

    def add_step_timing_listener(self, listener: Callable[[StepTiming], None]) -> None:
        """Call ``listener(StepTiming)`` after every step, once its outputs are delivered, on the worker thread.

        Costs a device sync per part of every step while registered (benchmarks only); none when no one listens."""
        self._timing_listeners.append(listener)

    @property
    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive() and not self._stopping

    def warmup(self, steps: int = 3) -> None:
        """Run full-batch steps on silence (compiles CUDA graphs) before any stream arrives, in the main batch
        and in the lane."""
        with self._cond:
            if any(s.in_use for s in self._slots):
                raise RuntimeError("warm up before serving streams")
        self._warm(self.batch_size, steps)
        for lane in self._lanes:
            with lane.active():
                self._warm(lane.size, steps)

    def _warm(self, rows: int, steps: int) -> None:
        all_on = torch.ones(rows, dtype=torch.bool, device=self.model.device)
        pcm = torch.zeros((rows, 1, FRAME_SIZE * self.frames_per_step), device=self.model.device)
        with torch.no_grad():
            for _ in range(steps):
                self.model.mimi.set_exec_mask(all_on)
                self._lm_gen.set_exec_mask(all_on)
                codes = self.model.mimi.encode(pcm)
                for j in range(self.frames_per_step):
                    self._lm_gen.step_with_extra_heads(codes[:, :, j:j + 1])
            self.model.mimi.reset_streaming(all_on)
            self._lm_gen.reset_streaming(all_on)

    # ---------------------------------------------------------------- stream API (any thread)
    def open(self, sink: Sink, timeout: float = 0.0, options: DecodingOptions | None = None) -> StreamHandle:
        """Take a free slot for a new stream; when all are in use, wait up to ``timeout`` seconds for one.

        Raises ``NoFreeSlot`` once the wait is over, ``EngineStopped`` when the engine is not (or no longer)
        running, ``ValueError`` for ``options`` out of range. The wait blocks the calling thread (asyncio
        callers: ``service.open_stream``). A sampling stream without a seed gets a random one (in the handle)."""
        options = (options or DecodingOptions()).check()
        seed = None
        if options.temperature > 0:
            seed = options.seed if options.seed is not None else secrets.randbits(32)
        edges = keyterm_trie(self.model.tokenizer, options.keyterms) if options.keyterms else []
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if not self.alive:
                    raise EngineStopped("the engine is not running")
                slot = next((s for s in self._slots if not s.in_use), None)
                if slot is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoFreeSlot(f"all {self.batch_size} slots are in use")
                self._cond.wait(left)  # _release and stop() notify
            slot.stream_id = next(self._ids)
            slot.sink = sink
            slot.buffer = _AudioQueue(np.zeros(self.model.prefix_frames * FRAME_SIZE, np.float32))
            slot.needs_reset = slot.needs_init = True
            slot.closing = False
            slot.flush_frames_left = self.flush_frames
            slot.frames_done = 0
            slot.decoding = (options, seed, edges)
            slot.needs_context_reset = False
            slot.frames_taken = 0
            slot.awaited = 0
            slot.changes = []
            self._cond.notify_all()
            return StreamHandle(slot.index, slot.stream_id, seed)

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
                raise StreamClosed("stream is closed")
            slot.buffer.push(pcm.copy())  # the caller may reuse its array
            if len(slot.buffer) >= FRAME_SIZE * self.frames_per_step:
                self._cond.notify_all()

    def close(self, handle: StreamHandle, flush: bool = True) -> None:
        """No more audio: flush (unless ``flush`` is false), deliver the last outputs and StreamEnd, then free the
        slot."""
        with self._cond:
            slot = self._own(handle)
            if slot is not None and not slot.closing:
                slot.closing = True
                if not flush:
                    slot.flush_frames_left = 0
                self._cond.notify_all()

    def abort(self, handle: StreamHandle) -> None:
        """Drop the stream now (client gone): no more outputs, the slot is free at once."""
        with self._cond:
            slot = self._own(handle)
            if slot is not None:
                self._release(slot)

    def reset(self, handle: StreamHandle) -> None:
        """Reset the stream's LM context before its next audio step (``ContextReset`` tells which frame)."""
        with self._cond:
            slot = self._own(handle)
            if slot is not None:
                slot.needs_context_reset = True

    def expedite(self, handle: StreamHandle, frame: int) -> None:
        """A client awaits the stream's outputs up to frame ``frame`` (a finalize): in lane steps its frames go
        ahead of other streams' (``_most_waiting``), in steps no bigger than they need (``_step_frames``)."""
        with self._cond:
            slot = self._own(handle)
            if slot is not None:
                slot.awaited = max(slot.awaited, frame)

    def reconfigure(self, handle: StreamHandle, options: DecodingOptions, frame: int) -> None:
        """New decoding from the stream's frame ``frame`` on (``contract.Engine.reconfigure``); ``ValueError``
        when its keyterms come to too many pieces."""
        edges = keyterm_trie(self.model.tokenizer, options.keyterms) if options.keyterms else []
        with self._cond:
            slot = self._own(handle)
            if slot is None:
                return
            seed = slot.decoding[1]
            if seed is None and options.temperature > 0:
                seed = options.seed if options.seed is not None else secrets.randbits(32)
            if frame <= 0 and slot.frames_taken == 0:
                # no frame taken yet (its audio all still queued): start over as if opened with these options
                slot.needs_reset = slot.needs_init = True
                slot.decoding = (options, seed, edges)
                return
            slot.changes.append((max(frame, slot.frames_taken), (options, seed, edges)))

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
        slot.buffer = _AudioQueue()
        slot.closing = False
        slot.lane = slot.lane_row = -1  # its lane row (if any) is free; its next stream is reset in the main batch
        self._active.release(slot.index)
        self._cond.notify_all()  # wakes an open() waiting for a free slot

    # ---------------------------------------------------------------- worker
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    k = self.frames_per_step
                    while not self._stopping and not any(s.ready(k) or s.ends_unstepped() for s in self._slots):
                        self._cond.wait()
                    if self._stopping:
                        break
                    # here, after every delivery of the steps before: a StreamEnd never overtakes outputs
                    ending = [s for s in self._slots if s.ends_unstepped()]
                    ends = [(s.sink, StreamEnd(s.frames_done)) for s in ending]
                    for slot in ending:
                        self._release(slot)
                    plan = None
                    if any(s.ready(k) for s in self._slots):
                        t = time.perf_counter() if self._timing_listeners else 0.0
                        plan = self._plan_lane() or self._plan()
                        if self._timing_listeners:
                            plan.plan_seconds = time.perf_counter() - t
                for sink, end in ends:
                    call_sink(sink, [end])
                if plan is not None:
                    self._execute(plan)
        except BaseException:  # pragma: no cover - reported by /status as unhealthy
            log.exception("engine worker died")
            raise
        finally:
            with self._cond:
                for slot in self._slots:
                    if slot.in_use and slot.sink is not None:
                        call_sink(slot.sink, [StreamFailed("the engine stopped")])
                        self._release(slot)

    def _plan(self) -> _StepPlan:
        """Under the lock: decide what each slot does this step."""
        k, n = self.frames_per_step, self.batch_size
        plan = _StepPlan.empty(n, self._step_frames([s for s in self._slots if s.ready(k) and not s.needs_init]))
        self._set_decoding_active(self._decoding)
        # streams in the lane come back first (their state scattered back before the step)
        plan.leave = [(s.lane, s.lane_row, s.index) for s in self._slots if s.lane >= 0]
        for slot in self._slots:
            slot.lane = slot.lane_row = -1
        for slot in self._slots:
            if not slot.ready(k):
                continue
            i = slot.index
            plan.targets[i] = (slot, slot.stream_id, slot.sink)
            if slot.needs_reset:
                plan.reset[i] = True
                plan.configure[i] = slot.decoding
                slot.needs_reset = False
            if slot.needs_init:
                plan.init[i] = True
                slot.needs_init = False
                continue
            self._take_frames(plan, slot, i)
        return plan

    def _most_waiting(self, ready: list[_Slot], awaited: list[_Slot]) -> list[_Slot]:
        """The streams a lane step serves, of ``ready``, ``awaited`` being ``_awaited(ready)``.

        1. Streams whose client awaits a finalize's words (``expedite``), a few steps from them (at most
           ``AWAITED_STEPS`` big steps' worth): alone, so the words wait for their own frames only; with them any
           stream ``STARVING_STEPS`` big steps behind, so a client finalizing nonstop cannot starve the others.
        2. Else those with a big step's worth of frames waiting (``max_frames_per_step`` less one step: a stream
           that fell far behind), in one big step, while the others' frames wait for the next step.
        3. Else every stream with frames to step: streams that merely arrive out of phase are not made to take
           turns (that would lengthen every step and everyone's wait).
        All of it only where steps can be bigger than ``frames_per_step`` (the CPU mode), where a stream's steps
        alone cost less than with others."""
        most, k = self.max_frames_per_step, self.frames_per_step
        if most <= k:
            return ready
        if awaited:
            return awaited + [s for s in ready if s not in awaited and s.frames_available() >= STARVING_STEPS * most]
        return [s for s in ready if s.frames_available() >= most - k] or ready

    def _awaited(self, ready: list[_Slot]) -> list[_Slot]:
        """The streams of ``ready`` whose finalize's words are at most ``AWAITED_STEPS`` big steps away (none where
        steps are never bigger than ``frames_per_step``)."""
        most = self.max_frames_per_step
        if most <= self.frames_per_step:
            return []
        return [s for s in ready if 0 < s.awaited_frames() <= AWAITED_STEPS * most]

    def _step_frames(self, takers: list[_Slot]) -> int:
        """Frames per stream for a step whose audio rows are ``takers``: ``frames_per_step``, or the largest multiple
        of it that every one of them has waiting, up to ``max_frames_per_step`` for one stream and fewer for more:
        at most ``max_frames_per_step`` frame-rows in all, and never less than 2 steps' worth. Mimi's cost per call
        is what a bigger step saves, and with several rows there is little left to save beyond 2 steps' worth (tiny
        model, 2 cores: 3 rows x 4 frames 146 ms, x 8 frames 302), while a finalize arriving meanwhile waits for the
        whole step. When a client awaits a taker's finalize, no more than the frames its words need (whole steps):
        more would only delay them; and takers that are all awaited take them in one step up to
        ``awaited_frames_per_step`` (by default ``max_frames_per_call``, 16 frames), beyond ``max_frames_per_step``
        and its share per row: a second step would cost Mimi's call again while their clients wait (a backlog and
        flush, often 11-16 frames under load: one step of about 250 ms on 2 cores instead of 190 and 100; two
        finalizes at once: one step of both instead of three of 4 frames each). A closing stream's short last step is
        padded to ``frames_per_step``."""
        k = self.frames_per_step
        if self.max_frames_per_step == k or not takers:
            return k
        cap = min(self.max_frames_per_step, max(2 * k, self.max_frames_per_step // len(takers) // k * k))
        awaited = max(s.awaited_frames() for s in takers)
        if awaited:
            if all(s.awaited_frames() for s in takers):  # finalizes only: their words wait for every frame, and a
                cap = max(cap, self.awaited_frames_per_step)  # second step would cost Mimi's call again
            cap = min(cap, -(-awaited // k) * k)
        fewest = min(s.frames_available() for s in takers)
        return max(k, min(cap, fewest // k * k))

    def _set_decoding_active(self, decoding: SlotDecoding, slots: list[_Slot] | None = None) -> None:
        """Whether the hooks have work in the next step: some stream of ``slots`` (default: all) samples or boosts."""
        slots = self._slots if slots is None else slots
        used = [d for s in slots if s.in_use for d in (s.decoding, *(c for _, c in s.changes))]
        decoding.set_active([(options.temperature > 0, bool(edges)) for options, _, edges in used])

    def _plan_lane(self) -> _StepPlan | None:
        """Under the lock: when every stream with frames to step can step in a lane, or the streams of an awaited
        finalize can (None otherwise: a main step of them all), a step of those ``_most_waiting`` chooses in the
        smallest lane that holds them.
        A lane steps *instead of* the main batch, never beside it; it replaces a full-batch step by a smaller one.
        Streams stay in their lane rows from step to step; one not stepping gives its row up when a stepping stream
        needs it."""
        if not self._lanes:
            return None
        k = self.frames_per_step
        ready = [s for s in self._slots if s.ready(k)]
        awaited = self._awaited(ready)
        stepping = self._most_waiting(ready, awaited)
        # a finalize's streams step in a lane even when the others would not fit in one (the others wait a step);
        # otherwise every ready stream must fit, and those chosen are among them
        must_fit = stepping if awaited else ready
        if len(must_fit) > self._lanes[-1].size or not all(s.lane_ready(k) for s in must_fit):
            return None
        fits = [i for i, lane in enumerate(self._lanes) if lane.size >= len(stepping)]
        index, n = fits[0], self._lanes[fits[0]].size
        plan = _StepPlan.empty(n, self._step_frames(stepping), lane=index)
        for slot in stepping:
            if slot.lane >= 0 and slot.lane != index:  # in another lane: back to the main batch, then here
                plan.leave.append((slot.lane, slot.lane_row, slot.index))
                slot.lane = slot.lane_row = -1
        held = {s.lane_row: s for s in self._slots if s.lane == index}
        free = [row for row in range(n) if row not in held]
        # rows held by streams not stepping this time, for the stepping streams not in this lane yet
        spare = [row for row, s in held.items() if s not in stepping]  # _Slot compares by identity
        for slot in stepping:
            if slot.lane < 0:
                if not free:
                    row = spare.pop()
                    plan.leave.append((index, row, held[row].index))
                    held[row].lane = held[row].lane_row = -1
                    free.append(row)
                slot.lane, slot.lane_row = index, free.pop()
                plan.enter.append((slot.index, slot.lane_row))
        self._set_decoding_active(self._lanes[index].decoding, stepping)  # the lane's rows only
        for slot in stepping:
            plan.targets[slot.lane_row] = (slot, slot.stream_id, slot.sink)
            self._take_frames(plan, slot, slot.lane_row)
        self.lane_steps += 1
        return plan

    def _take_frames(self, plan: _StepPlan, slot: _Slot, i: int) -> None:
        """Under the lock: the slot's next frames (the step's ``frames``) into row ``i`` of the step."""
        k = plan.frames
        plan.audio[i] = True
        if slot.needs_context_reset:
            plan.context_reset[i] = True
            slot.needs_context_reset = False
        for j in range(k):
            if slot.frames_available() == 0:
                break  # the end of a closing stream: the rest of this step is padding, never delivered
            if slot.changes and slot.changes[0][0] <= slot.frames_taken:
                # new options from this frame's LM step on (the last of several for one frame); its step
                # number is the reference's (frame + 1)
                while slot.changes and slot.changes[0][0] <= slot.frames_taken:
                    _, slot.decoding = slot.changes.pop(0)
                plan.reconfigure.setdefault(j, []).append((i, slot.decoding, slot.frames_taken + 1))
            slot.take_frame(plan.pcm[i, j * FRAME_SIZE:(j + 1) * FRAME_SIZE])
            plan.deliver[i] += 1
            slot.frames_taken += 1

    def _lm_step(self, codes: torch.Tensor, mask: np.ndarray, decoding: SlotDecoding):
        exec_mask = torch.from_numpy(mask).to(self.model.device)
        self._lm_gen.set_exec_mask(exec_mask)
        decoding.exec_mask = exec_mask
        result = self._lm_gen.step_with_extra_heads(codes)
        assert result is not None  # no audio delays in STT models, so every step returns tokens
        tokens, heads = result
        pauses = torch.stack([h[:, 0, 0] for h in heads], dim=1) if heads else None
        return tokens[:, 0, 0], pauses

    @torch.no_grad()
    def _execute(self, plan: _StepPlan) -> None:
        start = time.perf_counter()
        device = self.model.device
        clock = _PartClock(device, start) if self._timing_listeners else None
        rows = plan.audio.size
        try:
            if self.fault_injector is not None:
                self.fault_injector()
            for lane, row, i in plan.leave:  # back to the main batch first: an entering slot may take the row
                self._lanes[lane].scatter(row, i, self._decoding)
            if plan.lane >= 0:
                lane = self._lanes[plan.lane]
                for i, row in plan.enter:
                    lane.gather(i, row, self._decoding)
                with lane.active():
                    tokens, pauses = self._compute(plan, rows, lane.decoding, clock)
            else:
                tokens, pauses = self._compute(plan, rows, self._decoding, clock)
            if clock:
                clock.mark("prepare" if tokens is None else "d2h")
        except Exception as exc:
            self._fail_step(plan.targets, exc)
            return
        elapsed = time.perf_counter() - start
        frames = int(plan.deliver.sum())
        self._steps += 1
        self._frames += frames
        self._last_step_seconds = elapsed
        streams = self._active.stepped([slot.index for row, (slot, stream_id, _) in plan.targets.items()
                                        if plan.deliver[row] and slot.stream_id == stream_id and slot.in_use])
        for listener in self._step_listeners:
            listener(frames, elapsed, streams)
        deliver_start = time.perf_counter()  # after the step listeners, which may be slow
        if tokens is not None:
            self._deliver_outputs(plan, tokens, pauses)
        if clock:
            parts = clock.parts
            timing = StepTiming(frames, elapsed, plan.plan_seconds, parts.get("prepare", 0.0), parts.get("mimi", 0.0),
                                parts.get("lm", 0.0), parts.get("d2h", 0.0), time.perf_counter() - deliver_start)
            for listener in self._timing_listeners:
                listener(timing)

    def _compute(self, plan: _StepPlan, rows: int, decoding: SlotDecoding, clock: _PartClock | None):
        """The step on the streaming states attached to the modules now (the main batch's or the lane's, ``rows``
        rows): resets, init steps, Mimi, the LM. Returns (tokens, pauses) on the host, or (None, None)."""
        device = self.model.device
        # LMGen's decoding hooks see the rows being stepped: the main batch's or the lane's
        self._lm_gen.on_text_logits_hook = decoding.on_text_logits
        self._lm_gen.on_text_hook = decoding.on_text_token
        if plan.reset.any():
            mask = torch.from_numpy(plan.reset).to(device)
            self.model.mimi.reset_streaming(mask)
            self._lm_gen.reset_streaming(mask)
            for i, options in plan.configure.items():
                decoding.configure(i, *options)
        init = plan.init
        if plan.context_reset.any():  # the LM forgets, Mimi and the stream's clock go on
            mask = torch.from_numpy(plan.context_reset).to(device)
            self._lm_gen.reset_streaming(mask)
            decoding.reset_terms(mask)
            init = plan.init | plan.context_reset
        if init.any():
            # the LM's first step after a reset ignores its input: no audio needed, outputs dropped
            self._lm_step(self._zero_codes[rows], init, decoding)
        tokens = pauses = None
        if plan.audio.any():
            self.model.mimi.set_exec_mask(torch.from_numpy(plan.audio).to(device))
            host = torch.from_numpy(plan.pcm)
            if self._pinned is not None:
                host = self._pinned[rows].copy_(host)
            batch = host.to(device, non_blocking=True)[:, None, :]
            if clock:
                clock.mark("prepare")
            codes = self.model.mimi.encode(batch)  # [B, K, frames]
            if clock:
                clock.mark("mimi")
            steps = []
            for j in range(plan.frames):
                for i, (options, seed, edges), step in plan.reconfigure.get(j, ()):
                    decoding.configure(i, options, seed, edges, step)
                steps.append(self._lm_step(codes[:, :, j:j + 1], plan.audio, decoding))
            if clock:
                clock.mark("lm")
            # one host sync per engine step, not one per slot or per frame
            tokens = torch.stack([t for t, _ in steps], dim=1).cpu().numpy()
            if steps[0][1] is not None:
                pauses = torch.stack([p for _, p in steps], dim=1).float().cpu().numpy()
        return tokens, pauses

    def _deliver_outputs(self, plan: _StepPlan, tokens: np.ndarray, pauses: np.ndarray | None) -> None:
        deliveries = []
        with self._cond:
            for index, (slot, stream_id, sink) in plan.targets.items():
                if not plan.audio[index] or slot.stream_id != stream_id or not slot.in_use:
                    continue  # init steps produce nothing; aborted streams get nothing
                events: list[EngineEvent] = []
                if plan.context_reset[index]:
                    events.append(ContextReset(slot.frames_done))
                for j in range(plan.deliver[index]):
                    events.append(StepOutput(
                        frame=slot.frames_done,
                        token=int(tokens[index, j]),
                        pauses=tuple(pauses[index, j].tolist()) if pauses is not None else None,
                        buffered_samples=len(slot.buffer),
                    ))
                    slot.frames_done += 1
                if slot.done():
                    events.append(StreamEnd(slot.frames_done))
                    self._release(slot)
                deliveries.append((sink, events))
        for sink, events in deliveries:
            call_sink(sink, events)

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
            call_sink(sink, [StreamFailed(f"internal error while transcribing: {type(exc).__name__}")])
