"""The batched NVIDIA engine (``engine.contract.Engine``): one cache-aware streaming FastConformer (CTC or RNNT) serves
every stream, one chunk of ``lookahead + 1`` encoder frames (80 ms each) per step.

Each slot holds its own encoder caches (``cache_last_channel[:, i]``, ``cache_last_time[:, i]``,
``cache_last_channel_len[i]``), its feature context (``features.FeatureBatch``) and its last CTC label; joining is a
reset of those rows. Every step runs the full batch of ``slots`` rows with the same shapes (NeMo's
``pad_and_drop_preencoded`` streaming: every chunk, the first included, has the pre-encoder cache in front, zeros at
the start), and a slot that does not step keeps its caches (``torch.where``), so a stream's outputs never depend on
its slot, its neighbours or when it joined. The reference is NeMo's own batch-1 streaming loop (``reference.py``).

CTC to the contract's one token per frame: a frame's label that is blank, or repeats the previous frame's label, is
padding; any other label is that piece (token id + ``TOKEN_OFFSET``). Words start at pieces that begin with "▁"
(``ModelInfo.word_start == "piece"``). RNNT: each slot continues its own hypothesis (NeMo's greedy batched decoding
with partial hypotheses; an idle row gets no frames), and a frame's tokens are those its hypothesis stamps with that
frame, the first in ``StepOutput.token``, the rest in ``more_tokens``. At the end of a stream its last chunk is padded with silence; only the
stream's own frames are delivered.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from kyutai_stt.engine import batch_invariant
from kyutai_stt.engine.contract import (ActiveStreams, ContextReset, DecodingOptions, EngineEvent, EngineStats,
    EngineStopped, ModelInfo, NoFreeSlot, Sink, StepListener, StepOutput, StepTiming, StreamClosed, StreamEnd,
    StreamFailed, StreamHandle, call_sink)
from kyutai_stt.engine.nemo.checkpoint import NemoModel
from kyutai_stt.engine.nemo.features import FRAME_24K, LOOKAHEAD_24K, FeatureBatch

log = logging.getLogger(__name__)

TOKEN_OFFSET = 2  # contract token ids: 0 word boundary (never sent), 1 padding, 2 + NeMo's piece id
PADDING, BOUNDARY = 1, 0


def describe(model: NemoModel, chunk_frames: int) -> ModelInfo:
    processor = model.asr.tokenizer.tokenizer  # sentencepiece
    # <unk> and control pieces carry no text (their strings would otherwise reach the client as "<unk>")
    pieces = tuple("" if processor.is_unknown(i) or processor.is_control(i) else processor.id_to_piece(i)
                   for i in range(model.asr.tokenizer.vocab_size))
    return ModelInfo(
        name=model.name, family="nemo", pieces=("<boundary>", "<pad>") + pieces, first_piece_token=TOKEN_OFFSET,
        padding_token=PADDING, boundary_token=BOUNDARY, sample_rate=24000, frame_size=FRAME_24K,
        delay_frames=0, prefix_frames=0, frames_per_step=chunk_frames, flush_frames=0,
        languages=("en",), device=str(model.device), dtype="float32", random_weights=model.random_weights,
        word_start="piece", lookahead_frames=1)


class _AudioQueue:
    """A stream's waiting audio as the chunks pushed (a push costs its own size); ``read`` may leave a tail unread
    (the look-ahead is read twice: as this chunk's context and as the next chunk's audio)."""

    def __init__(self):
        self._chunks: deque[np.ndarray] = deque()
        self._offset = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, pcm: np.ndarray) -> None:
        if pcm.size:
            self._chunks.append(pcm)
            self._size += pcm.size

    def read(self, out: np.ndarray, consume: int) -> None:
        """Fill ``out`` with the next samples (zeros past the end), then drop the first ``consume`` of them."""
        filled, offset = 0, self._offset
        for chunk in self._chunks:
            part = chunk[offset:offset + out.size - filled]
            out[filled:filled + part.size] = part
            filled += part.size
            offset = 0
            if filled == out.size:
                break
        out[filled:] = 0
        consume = min(consume, self._size)
        self._size -= consume
        while consume:
            head = self._chunks[0]
            take = min(consume, head.size - self._offset)
            self._offset += take
            consume -= take
            if self._offset == head.size:
                self._chunks.popleft()
                self._offset = 0


@dataclass(eq=False)
class _Slot:
    index: int
    stream_id: int = 0
    sink: Sink | None = None
    buffer: _AudioQueue = field(default_factory=_AudioQueue)
    needs_reset: bool = False
    closing: bool = False
    frames_left: int = 0  # once closing: frames of the stream not yet stepped
    frames_done: int = 0
    reset_asked: bool = False  # Engine.reset: the caches restart at the next step, announced by a ContextReset
    reset_at: int | None = None  # the frame of the step that restarted them, announced with its outputs

    @property
    def in_use(self) -> bool:
        return self.sink is not None

    def ready(self, chunk: int) -> bool:
        if not self.in_use:
            return False
        if self.closing:
            return True  # its last chunks, or (nothing left) its StreamEnd
        return len(self.buffer) >= chunk * FRAME_24K + LOOKAHEAD_24K


class Engine:
    """The batched NVIDIA engine; implements ``engine.contract.Engine``."""

    counts_step_metrics = True

    def __init__(self, model: NemoModel, slots: int):
        self.model = model
        self.batch_size = slots
        asr = model.asr
        cfg = asr.encoder.streaming_cfg
        self.chunk_frames = model.lookahead + 1
        self._chunk_features = cfg.chunk_size[1] if isinstance(cfg.chunk_size, list) else cfg.chunk_size
        pre_cache = cfg.pre_encode_cache_size
        self._pre_cache = pre_cache[1] if isinstance(pre_cache, list) else pre_cache
        self._drop = cfg.drop_extra_pre_encoded
        self._rnnt = hasattr(asr, "joint")  # RNNT/TDT (hybrid models too: their RNNT head), else CTC
        self._blank = asr.tokenizer.vocab_size  # NeMo's blank follows the pieces, CTC and RNNT alike
        self._hyps: list = [None] * slots  # RNNT: each slot's hypothesis so far (its decoder state)
        self._rnnt_frames = [0] * slots  # RNNT: the slot's frames decoded before this step
        self.info = describe(model, self.chunk_frames)
        self.frames_per_step = self.chunk_frames
        self._step_listeners: list[StepListener] = []
        self._active = ActiveStreams(slots)  # the listeners' ``streams``
        self._timing_listeners: list[Callable[[StepTiming], None]] = []
        self._slots = [_Slot(i) for i in range(slots)]
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._steps = self._frames = self._failures = 0
        self._last_step_seconds = 0.0
        self.fault_injector: Callable[[], None] | None = None
        if model.device.type == "cpu" and batch_invariant.enable_strict_cnr() is False:
            log.warning("MKL is not in strict reproducible mode: a stream's outputs may depend on its slot")
        self._features = FeatureBatch(asr.preprocessor, slots, asr.encoder._feat_in, self._pre_cache, model.device)
        channel, time_, channel_len = asr.encoder.get_initial_cache_state(batch_size=slots, device=model.device)
        self._cache_channel, self._cache_time, self._cache_len = channel, time_, channel_len
        self._last_label = torch.full((slots,), self._blank, dtype=torch.long)

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

    def add_step_listener(self, listener: StepListener) -> None:
        self._step_listeners.append(listener)

    def add_step_timing_listener(self, listener: Callable[[StepTiming], None]) -> None:
        self._timing_listeners.append(listener)

    @property
    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive() and not self._stopping

    def warmup(self, steps: int = 2) -> None:
        """Full-batch steps on silence before any stream (allocations), then every slot reset."""
        all_on = torch.ones(self.batch_size, dtype=torch.bool)
        pcm = torch.zeros(self.batch_size, self.chunk_frames * FRAME_24K + LOOKAHEAD_24K)
        for _ in range(steps):
            self.step_tokens(pcm, all_on, np.full(self.batch_size, self.chunk_frames))
        self._reset(all_on)

    # ---------------------------------------------------------------- stream API (any thread)
    def open(self, sink: Sink, timeout: float = 0.0, options: DecodingOptions | None = None) -> StreamHandle:
        if options is not None and not options.check().is_default:
            # greedy CTC/RNNT labels only: the sampling and keyterm hooks are the Kyutai engine's text head
            raise ValueError("the NeMo family decodes greedily: temperature and keyterms are not supported")
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
                self._cond.wait(left)
            slot.stream_id = next(self._ids)
            slot.sink = sink
            slot.buffer = _AudioQueue()
            slot.needs_reset = True
            slot.closing = False
            slot.frames_done = 0
            slot.reset_asked, slot.reset_at = False, None
            return StreamHandle(slot.index, slot.stream_id)

    def reset(self, handle: StreamHandle) -> None:
        """The stream's caches restart at its next step (as a new stream's do); its clock goes on."""
        with self._cond:
            slot = self._own(handle)
            if slot is not None and not slot.closing:
                slot.needs_reset = slot.reset_asked = True

    def reconfigure(self, handle: StreamHandle, options: DecodingOptions, frame: int) -> None:
        """Greedy labels only (see ``open``): the default options are the only ones, anything else is refused."""
        if not options.check().is_default:
            raise ValueError("the NeMo family decodes greedily: temperature and keyterms are not supported")

    def expedite(self, handle: StreamHandle, frame: int) -> None:
        """Nothing to reorder: every stream with a chunk ready steps in each batch."""

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
            slot.buffer.push(pcm.copy())
            if slot.ready(self.chunk_frames):
                self._cond.notify_all()

    def close(self, handle: StreamHandle, flush: bool = True) -> None:
        # (no delay flush in this family: its end steps the buffered frames, the last chunk padded, either way)
        with self._cond:
            slot = self._own(handle)
            if slot is not None and not slot.closing:
                slot.closing = True
                slot.frames_left = -(-len(slot.buffer) // FRAME_24K)
                self._cond.notify_all()

    def abort(self, handle: StreamHandle) -> None:
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
        slot.buffer = _AudioQueue()
        slot.closing = False
        self._active.release(slot.index)
        self._cond.notify_all()

    # ---------------------------------------------------------------- worker
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not any(s.ready(self.chunk_frames) for s in self._slots):
                        self._cond.wait()
                    if self._stopping:
                        break
                    plan = self._plan()
                self._execute(*plan)
        except BaseException:  # pragma: no cover - reported by /status as unhealthy
            log.exception("engine worker died")
            raise
        finally:
            with self._cond:
                for slot in self._slots:
                    if slot.in_use and slot.sink is not None:
                        call_sink(slot.sink, [StreamFailed("the engine stopped")])
                        self._release(slot)

    def _plan(self):
        """Under the lock: which slots step, with which audio (a closing stream's last chunk padded with silence)."""
        n, c = self.batch_size, self.chunk_frames
        reset = torch.zeros(n, dtype=torch.bool)
        active = torch.zeros(n, dtype=torch.bool)
        pcm = np.zeros((n, c * FRAME_24K + LOOKAHEAD_24K), np.float32)
        deliver = np.zeros(n, int)
        targets = {}
        for slot in self._slots:
            if not slot.ready(c):
                continue
            i = slot.index
            targets[i] = (slot, slot.stream_id, slot.sink)
            reset[i], slot.needs_reset = slot.needs_reset, False
            if slot.reset_asked:
                slot.reset_asked, slot.reset_at = False, slot.frames_done
            if slot.closing and slot.frames_left <= 0:
                continue  # nothing left to step: only its StreamEnd
            active[i] = True
            slot.buffer.read(pcm[i], c * FRAME_24K)
            if slot.closing:
                deliver[i] = min(c, slot.frames_left)
                slot.frames_left -= deliver[i]
            else:
                deliver[i] = c
        return reset, active, torch.from_numpy(pcm), deliver, targets

    def _reset(self, mask: torch.Tensor) -> None:
        device_mask = mask.to(self.model.device)
        self._features.reset(device_mask)
        self._cache_channel[:, device_mask] = 0
        self._cache_time[:, device_mask] = 0
        self._cache_len[device_mask] = 0
        self._last_label[mask] = self._blank
        for i in mask.nonzero().flatten().tolist():
            self._hyps[i] = None
            self._rnnt_frames[i] = 0

    @torch.no_grad()
    def _encode(self, pcm: torch.Tensor, active: torch.Tensor):
        """The encoder on one chunk for every row; the ``active`` rows' caches move on. (encoded, lengths)."""
        device = self.model.device
        features = self._features.chunk(pcm.to(device, non_blocking=True), active.to(device))
        lengths = torch.full((self.batch_size,), features.shape[2], dtype=torch.long, device=device)
        encoder = self.model.asr.encoder
        encoded, encoded_len, channel, time_, channel_len = encoder.cache_aware_stream_step(
            processed_signal=features, processed_signal_length=lengths, cache_last_channel=self._cache_channel,
            cache_last_time=self._cache_time, cache_last_channel_len=self._cache_len, keep_all_outputs=True,
            drop_extra_pre_encoded=self._drop)
        keep = active.to(device)
        self._cache_channel = torch.where(keep[None, :, None, None], channel, self._cache_channel)
        self._cache_time = torch.where(keep[None, :, None, None], time_, self._cache_time)
        self._cache_len = torch.where(keep, channel_len, self._cache_len)
        return encoded, encoded_len

    @torch.no_grad()
    def step_tokens(self, pcm: torch.Tensor, active: torch.Tensor, deliver: np.ndarray) -> list[list[list[int]]]:
        """One step's compute: per row, per frame of the chunk, the contract tokens it emitted ([] for none)."""
        encoded, encoded_len = self._encode(pcm, active)
        if self._rnnt:
            return self._rnnt_tokens(encoded, encoded_len, active)
        # CTC: a label that is blank or repeats the previous frame's is no new text
        labels = self.model.asr.decoder(encoder_output=encoded).argmax(dim=-1)[:, :self.chunk_frames].cpu()
        previous = torch.cat([self._last_label[:, None], labels[:, :-1]], dim=1)
        emitted = (labels != self._blank) & (labels != previous)
        last = labels.gather(1, torch.from_numpy(np.maximum(deliver - 1, 0))[:, None])[:, 0]
        self._last_label = torch.where(active, last, self._last_label)
        rows = (labels + TOKEN_OFFSET).tolist()
        return [[[row[j]] if flags[j] else [] for j in range(len(row))]
                for row, flags in zip(rows, emitted.tolist())]

    def _rnnt_tokens(self, encoded, encoded_len, active) -> list[list[list[int]]]:
        """RNNT/TDT greedy decoding for the whole batch, each row continuing its own hypothesis (an idle row gets
        no frames and keeps it). A frame may emit several tokens; the hypothesis' timestamps say which frame."""
        lengths = torch.where(active.to(encoded_len.device), encoded_len, torch.zeros_like(encoded_len))
        lengths = lengths.clamp(max=self.chunk_frames)
        before = [len(h.y_sequence) if h is not None else 0 for h in self._hyps]
        out = self.model.asr.decoding.rnnt_decoder_predictions_tensor(
            encoder_output=encoded, encoded_lengths=lengths, return_hypotheses=True,
            partial_hypotheses=list(self._hyps))
        hyps = out[0] if isinstance(out, tuple) else out
        rows: list[list[list[int]]] = []
        for i, hyp in enumerate(hyps):
            frames: list[list[int]] = [[] for _ in range(self.chunk_frames)]
            if bool(active[i]):
                self._hyps[i] = hyp
                base = self._rnnt_frames[i]
                tokens = hyp.y_sequence[before[i]:]
                tokens = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
                stamps = hyp.timestamp[before[i]:]
                stamps = stamps.tolist() if torch.is_tensor(stamps) else list(stamps)
                for token, stamp in zip(tokens, stamps):
                    frames[min(max(int(stamp) - base, 0), self.chunk_frames - 1)].append(int(token) + TOKEN_OFFSET)
                self._rnnt_frames[i] = base + self.chunk_frames
            rows.append(frames)
        return rows

    def _execute(self, reset, active, pcm, deliver, targets) -> None:
        start = time.perf_counter()
        try:
            if self.fault_injector is not None:
                self.fault_injector()
            if reset.any():
                self._reset(reset)
            tokens = self.step_tokens(pcm, active, deliver)
        except Exception as exc:
            self._fail_step(targets, exc)
            return
        elapsed = time.perf_counter() - start
        frames = int(deliver.sum())
        self._steps += 1
        self._frames += frames
        self._last_step_seconds = elapsed
        streams = self._active.stepped([i for i, (slot, stream_id, _) in targets.items()
                                        if deliver[i] and slot.stream_id == stream_id and slot.in_use])
        for listener in self._step_listeners:
            listener(frames, elapsed, streams)
        deliver_start = time.perf_counter()
        self._deliver(targets, tokens, deliver)
        if self._timing_listeners:
            timing = StepTiming(frames, elapsed, 0.0, 0.0, 0.0, elapsed, 0.0, time.perf_counter() - deliver_start)
            for listener in self._timing_listeners:
                listener(timing)

    def _deliver(self, targets, tokens: list[list[list[int]]], deliver: np.ndarray) -> None:
        deliveries = []
        with self._cond:
            for index, (slot, stream_id, sink) in targets.items():
                if slot.stream_id != stream_id or not slot.in_use:
                    continue
                events: list[EngineEvent] = []
                if slot.reset_at is not None:
                    events.append(ContextReset(slot.reset_at))
                    slot.reset_at = None
                for j in range(deliver[index]):
                    emitted = tokens[index][j]
                    events.append(StepOutput(frame=slot.frames_done, token=emitted[0] if emitted else PADDING,
                                             pauses=None, buffered_samples=len(slot.buffer),
                                             more_tokens=tuple(emitted[1:])))
                    slot.frames_done += 1
                if slot.closing and slot.frames_left <= 0:
                    events.append(StreamEnd(slot.frames_done))
                    self._release(slot)
                deliveries.append((sink, events))
        for sink, events in deliveries:
            call_sink(sink, events)

    def _fail_step(self, targets, exc: Exception) -> None:
        log.exception("engine step failed; failing %d stream(s)", len(targets))
        self._failures += 1
        deliveries = []
        with self._cond:
            for index, (slot, stream_id, sink) in targets.items():
                if slot.in_use and slot.stream_id == stream_id:
                    self._release(slot)  # the next stream in it is reset (open sets needs_reset)
                    deliveries.append(sink)
        for sink in deliveries:
            call_sink(sink, [StreamFailed(f"internal error while transcribing: {type(exc).__name__}")])
