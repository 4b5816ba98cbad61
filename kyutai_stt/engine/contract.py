"""The engine contract: everything the rest of the house may rely on of a speech-to-text engine.

A stream takes a slot (``open``, with a ``Sink`` that receives its events), feeds it float PCM at the model's
sample rate (``push``), and ends it (``close``: the engine flushes, the last outputs come, then ``StreamEnd``) or
drops it (``abort``). Each engine step yields one ``StepOutput`` per frame of every stream in it: a text token and,
for models with VAD heads, the probability of a pause per head. ``ModelInfo`` says how to read those outputs
(pieces, padding and word-boundary tokens, frame timing, delay, which VAD head ends a turn, languages).

Two things implement ``Engine`` (the Protocol): the batched Kyutai engine in this process
(``engine.kyutai.engine.Engine``) and ``engine.ipc.EngineClient``, the same engine served from another process;
``ModelInfo`` and the events cross that boundary as they are (msgspec structs). ``engine.startup.start_engine``
builds, warms up and starts one from ``Settings``; nothing else in the package constructs one.

A second model family (another streaming model, a later Kyutai model) is a new ``engine/<family>/`` package that
loads its model, implements ``Engine`` (steps, events) and describes itself with a ``ModelInfo``, plus one branch in
``engine.startup`` that chooses it. Sessions, words, protocols and the multi-process wire do not change.

This module imports neither torch nor the model's packages: the wire messages, the client and every layer above
the engine import it freely.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, ClassVar, Protocol, runtime_checkable

import msgspec
import numpy as np

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the model
class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a served model is and how to read its outputs; made by the engine, sent whole to worker processes."""

    name: str  # the checkpoint: a repository id or a folder
    family: str  # the engine family that serves it ("kyutai")
    pieces: tuple[str, ...]  # the tokenizer's vocabulary: token id -> sentencepiece piece ("▁" a space, "<0xNN>" a byte)
    first_piece_token: int  # tokens below this carry no text (padding, word boundary, control tokens)
    padding_token: int  # "no new text at this step"
    boundary_token: int  # "a new word starts at this step"
    sample_rate: int  # Hz of the PCM the engine takes
    frame_size: int  # samples per frame: one text token per frame
    delay_frames: int  # a token lags the audio that produced it by this many frames
    prefix_frames: int  # silent frames the engine feeds before a stream's audio
    frames_per_step: int  # frames each stream advances per engine step
    flush_frames: int  # silent frames fed after a stream's audio when it is closed (the delay included)
    vad_horizons: tuple[float, ...] = ()  # per VAD head, how far ahead (s) it predicts a pause; () without heads
    end_of_turn_head: int | None = None  # the VAD head whose pause probability ends a turn
    languages: tuple[str, ...] = ()  # ISO 639-1 codes it transcribes, the most likely first
    # where words start: "boundary" (Kyutai: the boundary token; a padding completes a word) or "piece" (NeMo: a
    # piece that begins with "▁"; a word is complete when the next one starts or the stream ends)
    word_start: str = "boundary"
    # frames of audio past a step's last frame the engine needs before it steps it (NeMo: the STFT window and the
    # resampler reach 8 ms into the next frame); a mid-stream flush feeds them as silence
    lookahead_frames: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    random_weights: bool = False  # a test checkpoint: the text is meaningless

    @property
    def frame_rate(self) -> float:
        """Frames per second (12.5 for Kyutai's 80 ms frames)."""
        return self.sample_rate / self.frame_size

    @property
    def lead_frames(self) -> int:
        """Frames between the start of a stream and the token of its first audio frame: prefix plus delay."""
        return self.delay_frames + self.prefix_frames

    def piece(self, token: int) -> str:
        return self.pieces[token]


# ---------------------------------------------------------------------------------------------- events
class StepOutput(msgspec.Struct, frozen=True, tag=True):
    """What one step produced for one stream (one frame)."""

    frame: int  # index of the stream's frame (silence prefix included) that produced the token
    token: int  # text token (read with ``ModelInfo``: padding, word boundary or a piece)
    pauses: tuple[float, ...] | None  # per VAD head, probability of no voice activity; None without heads
    buffered_samples: int  # audio of this stream waiting in the engine after this step
    more_tokens: tuple[int, ...] = ()  # further text tokens of the same frame, in order (RNNT may emit several)


class ContextReset(msgspec.Struct, frozen=True, tag=True):
    """The stream's model context was reset (``Engine.reset``) before the step of this frame; the stream's clock
    goes on (frames, and so word times, keep counting)."""

    frame: int


class StreamEnd(msgspec.Struct, frozen=True, tag=True):
    """The stream was flushed: every output for its audio has been delivered."""

    frames: int


class StreamFailed(msgspec.Struct, frozen=True, tag=True):
    """The engine could not process this stream; no more outputs will come."""

    reason: str


EngineEvent = StepOutput | ContextReset | StreamEnd | StreamFailed
Sink = Callable[[list[EngineEvent]], None]  # called on the engine's own thread, never concurrently for one stream


def call_sink(sink: Sink, events: list[EngineEvent]) -> None:
    """Hand ``events`` to a stream's sink; a broken consumer must never stop the engine (or the I/O thread)."""
    try:
        sink(events)
    except Exception:
        log.exception("stream sink raised")


class StreamHandle(msgspec.Struct, frozen=True):
    """A stream's hold on its slot; ``stream_id`` tells a slot's successive streams apart."""

    slot: int
    stream_id: int
    seed: int | None = None  # the sampling seed in use (drawn by the engine when not given); None when greedy


# ---------------------------------------------------------------------------------------------- decoding
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**32 - 1
MAX_KEYTERMS = 300
MAX_KEYTERM_CHARS = 64


class DecodingOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How one stream decodes, given at ``open`` (and changed mid-stream by ``reconfigure``). The default (greedy, no keyterms) is bit-identical to an engine
    without these options, and costs nothing.

    ``temperature`` > 0 samples the text token from ``softmax((logits + bias) / temperature)``; the draws depend
    only on ``seed`` and the stream's own step, never on its slot, its neighbours or the batch size, so the same
    audio with the same seed gives the same tokens at any load. ``keyterms`` bias the text head toward the
    tokenizations of these terms (``keyterm_boost`` of the server)."""

    temperature: float = 0.0
    seed: int | None = None  # None: the engine draws one (reported in ``StreamHandle.seed``)
    keyterms: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        return self.temperature == 0.0 and not self.keyterms

    def check(self) -> "DecodingOptions":
        """Raise ``ValueError`` (a message for the client) when out of range; return self."""
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be between 0 and {MAX_TEMPERATURE:g} (0: greedy), "
                             f"got {self.temperature!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {self.seed!r}")
        if len(self.keyterms) > MAX_KEYTERMS:
            raise ValueError(f"at most {MAX_KEYTERMS} keyterms, got {len(self.keyterms)}")
        for term in self.keyterms:
            if not term.strip() or len(term) > MAX_KEYTERM_CHARS:
                raise ValueError(f"a keyterm must be 1 to {MAX_KEYTERM_CHARS} characters, got {term!r}")
        return self


def split_keyterms(text: str) -> tuple[str, ...]:
    """Terms from one string (OpenAI's ``prompt``, a query parameter): comma- or newline-separated, trimmed."""
    return tuple(t.strip() for t in text.replace("\n", ",").split(",") if t.strip())


class EngineStats(msgspec.Struct):
    slots_total: int
    slots_in_use: int
    steps: int
    frames: int
    worker_alive: bool
    last_step_seconds: float
    failures: int


class StepTiming(msgspec.Struct, frozen=True):
    """Where one engine step's time went, in seconds (``add_step_timing_listener``; benchmarks).

    While a timing listener is registered the engine synchronises the device after each part, so on CUDA each
    part is that part's own device time, and the step is a little slower than without. On the CPU the parts are
    plain wall-clock time."""

    frames: int  # frames stepped (as given to step listeners)
    seconds: float  # the step as step listeners see it: prepare + mimi + lm + d2h
    plan: float  # before ``seconds``, under the lock: choosing the slots, copying their frames into the batch
    prepare: float  # resets, init steps, exec masks, audio to the device
    mimi: float  # the audio encoder on the batch
    lm: float  # the LM steps (``frames_per_step`` of them)
    d2h: float  # tokens and VAD probabilities back to the host
    deliver: float  # after ``seconds``: building the outputs and calling every sink


# ---------------------------------------------------------------------------------------------- errors
class NoFreeSlot(RuntimeError):
    """Every slot is in use."""


class StreamClosed(RuntimeError):
    """The stream no longer holds its slot (ended, aborted or failed)."""


class EngineStopped(RuntimeError):
    """The engine is not running (stopped, or its worker died)."""


class ModelLoadError(RuntimeError):
    """The model could not be found, downloaded or loaded; the message says what to do."""


# ---------------------------------------------------------------------------------------------- the engine
# (frames in the step, seconds, streams): ``streams`` is how many streams that still hold their slot the engine
# stepped in the last ``ACTIVE_SECONDS`` (this step's included), so a listener can tell the audio each stream
# advanced when steps serve some streams only (lanes) or carry more frames for some (bigger steps)
StepListener = Callable[[int, float, int], None]
ACTIVE_SECONDS = 5.0


class ActiveStreams:
    """Which slots stepped recently: ``stepped(slots)`` after each step returns the ``streams`` of ``StepListener``;
    ``release(slot)`` when its stream is gone (it no longer counts)."""

    def __init__(self, slots: int):
        self._at = np.full(slots, -np.inf)

    def release(self, slot: int) -> None:
        self._at[slot] = -np.inf

    def stepped(self, slots: list[int]) -> int:
        now = time.monotonic()
        self._at[slots] = now
        return int((self._at > now - ACTIVE_SECONDS).sum())


@runtime_checkable
class Engine(Protocol):
    """A running engine, in this process or another. Every method may be called from any thread."""

    info: ModelInfo
    batch_size: int  # slots: streams served at once
    # False where step metrics are recorded elsewhere (the engine process counts them once for every worker)
    counts_step_metrics: ClassVar[bool]

    @property
    def alive(self) -> bool: ...

    def open(self, sink: Sink, timeout: float = 0.0, options: DecodingOptions | None = None) -> StreamHandle:
        """Take a free slot, waiting up to ``timeout`` s for one (blocking): ``NoFreeSlot``, ``EngineStopped``.
        ``options``: how the stream decodes (default greedy); ``ValueError`` when out of range."""

    def push(self, handle: StreamHandle, pcm: np.ndarray) -> None:
        """Queue float PCM of any length (``StreamClosed`` once the stream is closing or gone)."""

    def close(self, handle: StreamHandle, flush: bool = True) -> None:
        """No more audio: flush, deliver the last outputs and ``StreamEnd``, then free the slot. ``flush=False``:
        no flush silence after the audio (a finalize's flush just covered it: nothing since needs the model's
        delay); a family whose end has no such silence (NeMo pads its last chunk only) ends as always."""

    def abort(self, handle: StreamHandle) -> None:
        """Drop the stream now: no more outputs, the slot is free at once."""

    def reset(self, handle: StreamHandle) -> None:
        """Reset the stream's model context before its next step (a stalled decoder); its clock goes on, and a
        ``ContextReset`` event says at which frame. Audio and outputs already queued are kept."""

    def reconfigure(self, handle: StreamHandle, options: DecodingOptions, frame: int) -> None:
        """Decode the stream with ``options`` from its frame ``frame`` on (silence prefix included; the LM step of
        that frame is the first with them), so the result depends on the audio and on ``frame`` only, never on
        when the call came. ``frame`` 0 before any audio frame was stepped: as if opened with ``options``. A
        sampling stream keeps its seed (a greedy one gets ``options.seed`` or a random one) and its draws
        restart at step ``frame + 1``. ``options`` must be checked (``DecodingOptions.check``)."""

    def expedite(self, handle: StreamHandle, frame: int) -> None:
        """A client awaits the stream's outputs up to frame ``frame`` (a finalize; counted as ``StepOutput.frame +
        1``, the silence prefix included): step those frames ahead of other streams' where the engine can.
        Scheduling only: outputs never depend on it."""

    def buffered_samples(self, handle: StreamHandle) -> int:
        """Audio of the stream waiting in the engine (0 once it is gone)."""

    def stats(self) -> EngineStats: ...

    def add_step_listener(self, listener: StepListener) -> None:
        """Call ``listener(frames, seconds, streams)`` after every step (metrics, the real-time monitor)."""

    def add_step_timing_listener(self, listener: Callable[[StepTiming], None]) -> None:
        """Call ``listener(StepTiming)`` after every step (benchmarks; slows the steps a little)."""

    def stop(self) -> None: ...
