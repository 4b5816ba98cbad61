"""The lane (``engine.kyutai.lane``): whenever the streams with frames to step fit in it, they are stepped in the
lane's small batch instead of the main one, moving in and out as the others come and go (finalizes, resets,
sampling, keyterms, neighbours), and every stream still gets exactly the single-stream reference's outputs, with
Mimi called ``frames_per_step`` frames at a time as the engine does."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kyutai_stt.audio.constants import FRAME_SIZE
from kyutai_stt.engine.contract import ContextReset, DecodingOptions, StepOutput, StreamEnd
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.engine import Engine
from kyutai_stt.engine.kyutai.reference import reference_outputs
from kyutai_stt.engine.kyutai.lane import Lane
from kyutai_stt.stream.flush import flush_frames_after

from .test_decoding import keyterm_for

FRAMES_PER_STEP = 2
SAMPLING = DecodingOptions(temperature=0.5, seed=11)


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_model(str(checkpoint_dir), "cpu", "float32")


class Finalizer:
    """One stream from its own thread: each piece in chunks, then (but after the last) the flush silence a finalize
    feeds (``stream.flush``), waiting for the flush's last output before the next piece; then
    close. ``sent`` is all the audio the engine got, flush silences included (what the reference hears).
    ``lockstep``: push a step's frames at a time and wait for their outputs, so that streams are ready at varied
    moments and the engine steps varied sets of them (lanes of every size, streams moving between them)."""

    def __init__(self, engine: Engine, pieces: list[np.ndarray], options=None, barrier=None, reset_at: int = -1,
                 lockstep: bool = False):
        self.engine, self.pieces, self.barrier, self.reset_at = engine, pieces, barrier, reset_at
        self.lockstep = lockstep
        self.outputs: list[StepOutput] = []
        self.resets: list[int] = []
        self.end = None
        self.sent: list[np.ndarray] = []
        self._cond = threading.Condition()
        self.handle = engine.open(self.sink, options=options)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sink(self, events) -> None:
        with self._cond:
            for event in events:
                if isinstance(event, StepOutput):
                    self.outputs.append(event)
                elif isinstance(event, ContextReset):
                    self.resets.append(event.frame)
                else:
                    self.end = event
            self._cond.notify_all()

    def push(self, pcm: np.ndarray) -> None:
        before = sum(p.size for p in self.sent)
        self.sent.append(pcm)
        chunk = self.engine.frames_per_step * FRAME_SIZE if self.lockstep else 7000
        for start in range(0, pcm.size, chunk):
            self.engine.push(self.handle, pcm[start:start + chunk])
            if self.lockstep:
                k = self.engine.frames_per_step
                pushed = before + min(start + chunk, pcm.size)
                self.wait_for_frames(self.engine.info.prefix_frames + pushed // FRAME_SIZE // k * k)

    def run(self) -> None:
        samples = 0
        for i, piece in enumerate(self.pieces):
            self.push(piece)
            samples += piece.size
            if i == len(self.pieces) - 1:
                break
            # a live client: its audio is stepped as it comes, so a finalize finds only its flush waiting
            k = self.engine.frames_per_step
            self.wait_for_frames((self.engine.info.prefix_frames + samples // FRAME_SIZE) // k * k)
            pad, frames = flush_frames_after(samples, self.engine.info)
            silence = np.zeros(pad + frames * FRAME_SIZE, np.float32)
            if self.barrier is not None and i == 0:
                self.barrier.wait(timeout=60)  # the first finalizes of every stream at once: more than the lane
            self.push(silence)
            samples += silence.size
            if i == self.reset_at:
                self.engine.reset(self.handle)  # a context reset, taken by the lane's first step
            self.wait_for_frames(self.engine.info.prefix_frames + samples // FRAME_SIZE)
        self.engine.close(self.handle)
        with self._cond:
            assert self._cond.wait_for(lambda: self.end is not None, timeout=120)

    def wait_for_frames(self, frames: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.outputs) >= frames or self.end is not None, timeout=120)

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.sent)


def run_finalizers(model, clip, other, lane_slots: int, options: list):
    """Three streams finalizing twice (greedy with a context reset, sampling, keyterms) and a greedy neighbour
    that never finalizes, through 4 slots with a lane of ``lane_slots`` rows: lane and main steps interleave as
    the streams' frames come (more streams than lane rows), the hard case for the state moves."""
    engine = Engine(model, 4, frames_per_step=FRAMES_PER_STEP, lane_slots=lane_slots)  # the minimal flush
    engine.start()
    try:
        barrier = threading.Barrier(len(options))
        cuts = [(0, 10000), (10000, 21000), (21000, clip.size)]  # not frame-aligned: the flush pads them
        finalizers = [Finalizer(engine, [np.roll(clip, 7000 * n)[a:b] for a, b in cuts], options=o, barrier=barrier,
                                reset_at=1 if n == 0 else -1, lockstep=True)
                      for n, o in enumerate(options)]
        neighbour = Finalizer(engine, [other], lockstep=True)
        for stream in (*finalizers, neighbour):
            stream.thread.start()
        for stream in (*finalizers, neighbour):
            stream.thread.join(timeout=300)
        return finalizers + [neighbour], (engine.lane_steps, engine.stats().steps)
    finally:
        engine.stop()


def check_against_reference(reference_model, streams, options):
    for stream, opts in zip(streams, options + [None]):
        assert isinstance(stream.end, StreamEnd)
        kwargs = dict(mimi_frames_per_call=FRAMES_PER_STEP, resets=tuple(stream.resets))
        if opts is not None:
            kwargs["options"] = opts
        expected = reference_outputs(reference_model, stream.audio, **kwargs)
        assert [o.frame for o in stream.outputs] == list(range(len(expected)))
        assert [o.token for o in stream.outputs] == [o.token for o in expected]
        np.testing.assert_allclose([o.pauses for o in stream.outputs], [o.pauses for o in expected], atol=1e-4)


class MoveCounter:
    """Counts the lane's state moves (the real ``gather``/``scatter`` still run)."""

    def __init__(self, monkeypatch):
        self.gathers = self.scatters = 0
        gather, scatter = Lane.gather, Lane.scatter

        def counted_gather(lane, *args):
            self.gathers += 1
            gather(lane, *args)

        def counted_scatter(lane, *args):
            self.scatters += 1
            scatter(lane, *args)
        monkeypatch.setattr(Lane, "gather", counted_gather)
        monkeypatch.setattr(Lane, "scatter", counted_scatter)


@pytest.mark.parametrize("lane_slots", [2, 3])  # lanes of 1 and 2 rows; of 1, 2 and 3
def test_streams_through_the_lanes_equal_the_reference(model, reference_model, speech, sounds, monkeypatch,
                                                       lane_slots):
    clip = speech[:30000]
    other = sounds(1.0, 7)
    term, _ = keyterm_for(model, [])  # a one-piece word: its trie state moves with the row
    options = [None, SAMPLING, DecodingOptions(keyterms=(term,))]
    moves = MoveCounter(monkeypatch)
    streams, (lane_steps, steps) = run_finalizers(model, clip, other, lane_slots=lane_slots, options=options)
    # both kinds of step ran, and streams went in and out of the lanes more than once each
    assert 0 < lane_steps < steps
    assert moves.gathers > len(streams) and moves.scatters > 0
    assert len(streams[0].resets) == 1
    check_against_reference(reference_model, streams, options)


def test_a_lone_stream_steps_in_the_lane(model, reference_model, speech):
    """One client on a 4-slot engine: every step but its first (reset and init, in the main batch) and its padded
    last one computes the lane's single row, and the outputs are the reference's. (Its audio comes faster than
    real time, so most steps carry several steps' frames: ``max_frames_per_step``.)"""
    engine = Engine(model, 4, frames_per_step=FRAMES_PER_STEP, lane_slots=1).start()
    try:
        stream = Finalizer(engine, [speech[:30000], speech[30000:50000]])
        stream.thread.start()
        stream.thread.join(timeout=300)
        lane_steps, steps = engine.lane_steps, engine.stats().steps
    finally:
        engine.stop()
    assert steps - lane_steps <= 2 and lane_steps > 2
    check_against_reference(reference_model, [stream], [])


@pytest.mark.slow  # the check's own check (CI runs -m slow)
def test_the_check_fails_when_the_lane_loses_its_rows(model, reference_model, speech, sounds, monkeypatch):
    """The parity check above can fail: a lane that never copies its rows back to the main batch (a broken
    scatter) gives other tokens."""
    monkeypatch.setattr(Lane, "scatter", lambda self, row, slot, decoding: None)
    options = [None, None, None]
    moves = MoveCounter(monkeypatch)  # counts the broken scatter's calls
    for _ in range(3):  # which steps go through the lane depends on the threads' timing: on a loaded machine a run
        moves.scatters = 0  # may step nearly everything in the main batch; such a run shows nothing, so run again
        streams, (lane_steps, _) = run_finalizers(model, speech[:30000], sounds(1.0, 8), lane_slots=2,
                                                  options=options)
        if lane_steps >= 2 and moves.scatters > 0:
            break
    assert lane_steps >= 2 and moves.scatters > 0
    with pytest.raises(AssertionError):
        check_against_reference(reference_model, streams, options)


class Recorder:
    """A stream's sink: its outputs, and for each the engine step that delivered it."""

    def __init__(self, engine: Engine):
        self.engine, self.outputs, self.steps, self.end = engine, [], [], None
        self.audio: list[np.ndarray] = []
        self.resets: list[int] = []
        self.handle = engine.open(self.sink)

    def sink(self, events) -> None:
        for event in events:
            if isinstance(event, StepOutput):
                self.outputs.append(event)
                self.steps.append(self.engine.stats().steps)  # called after the step is counted
            elif isinstance(event, StreamEnd):
                self.end = event

    def push(self, pcm: np.ndarray) -> None:
        self.audio.append(pcm)
        self.engine.push(self.handle, pcm)


def wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("finalizing", [1, 2])
def test_an_awaited_finalize_steps_first_and_alone(model, reference_model, sounds, finalizing):
    """Four streams fill four slots, more than the largest lane holds, so they step in the main batch. Once the
    client of stream 0 (and of stream 1: two finalizes at once) awaits a finalize (``expedite``), its frames (a
    backlog of 6 frames and the flush) step in the lane without the others, in one step of exactly what the words
    need (more than ``max_frames_per_step`` and its share per row: one Mimi call, up to ``max_frames_per_call``),
    before any other stream's next frame; and every stream still gets the reference's outputs."""
    engine = Engine(model, 4, frames_per_step=FRAMES_PER_STEP).start()  # lanes of 1, 2 and 3 rows
    held, release = threading.Event(), threading.Event()

    def hold_once() -> None:
        engine.fault_injector = None
        held.set()
        release.wait(60)

    try:
        streams = [Recorder(engine) for _ in range(4)]
        clips = [sounds(1.6, 60 + n) for n in range(4)]
        for stream, clip in zip(streams, clips):
            stream.push(clip[:12 * FRAME_SIZE])
        prefix = engine.info.prefix_frames
        wait_until(lambda: all(len(s.outputs) >= prefix + 12 for s in streams))
        engine.fault_injector = hold_once
        for stream, clip in zip(streams, clips):  # the step these start is held while the rest comes in
            stream.push(clip[12 * FRAME_SIZE:14 * FRAME_SIZE])
        assert held.wait(60)
        held_step = engine.stats().steps + 1
        for stream, clip in zip(streams, clips):  # a step's worth and more for every stream
            stream.push(clip[14 * FRAME_SIZE:20 * FRAME_SIZE])
        pad, frames = flush_frames_after(20 * FRAME_SIZE, engine.info)  # the finalize's flush (stream.flush)
        awaited = prefix + 20 + engine.info.flush_frames
        assert engine.max_frames_per_step < awaited - prefix - 14 <= engine.awaited_frames_per_step
        finalizers, others = streams[:finalizing], streams[finalizing:]
        for stream in finalizers:
            stream.push(np.zeros(pad + frames * FRAME_SIZE, np.float32))
            engine.expedite(stream.handle, awaited)
        release.set()
        wait_until(lambda: all(len(s.outputs) >= awaited for s in finalizers))
        finalize_steps = sorted({step for s in finalizers for step in s.steps[prefix + 14:awaited] if step > held_step})
        lane_steps_before = engine.lane_steps
        for stream, clip in zip(streams, clips):
            if stream in others:
                stream.push(clip[20 * FRAME_SIZE:])
            engine.close(stream.handle)
        wait_until(lambda: all(s.end is not None for s in streams))
    finally:
        release.set()
        engine.stop()
    # the finalizes' frames after the held step: in one step of the finalizing streams only, right after the held one
    assert finalize_steps == [held_step + 1]  # the backlog and the flush, in one step
    for other in others:
        assert not set(other.steps) & set(finalize_steps)
        assert all(step < finalize_steps[0] or step > finalize_steps[-1] for step in other.steps)
    assert lane_steps_before >= len(finalize_steps)
    for stream in streams:
        stream.audio = np.concatenate(stream.audio)
    check_against_reference(reference_model, streams, [None] * 3)


def test_a_released_slot_leaves_the_step_listeners_streams_at_once(model):
    """The real-time monitor shares each step's frames among ``streams`` (``contract.StepListener``): a stream
    aborted or ended stops counting at once, not ``ACTIVE_SECONDS`` later."""
    engine = Engine(model, 4, frames_per_step=FRAMES_PER_STEP)
    seen: list[int] = []
    engine.add_step_listener(lambda frames, seconds, streams: seen.append(streams))
    engine.start()
    try:
        a, b, c = Recorder(engine), Recorder(engine), Recorder(engine)
        prefix = engine.info.prefix_frames
        for stream in (a, b, c):
            stream.push(np.zeros(2 * FRAME_SIZE, np.float32))
        wait_until(lambda: all(len(s.outputs) >= prefix + 2 for s in (a, b, c)))
        assert seen[-1] == 3
        engine.abort(b.handle)
        engine.close(c.handle)
        wait_until(lambda: c.end is not None)
        a.push(np.zeros(2 * FRAME_SIZE, np.float32))
        wait_until(lambda: len(a.outputs) >= prefix + 4)
        assert seen[-1] == 1
    finally:
        engine.stop()
