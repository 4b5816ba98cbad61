"""Engine parity: every stream gets exactly the tokens of a plain single-stream loop, whatever else happens."""

from __future__ import annotations

import numpy as np
import pytest

from kyutai_stt.audio.constants import FRAME_SIZE
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.engine import Engine, NoFreeSlot, StreamEnd, flush_frame_count

from harness import Feeder, run_feeders  # scripts/harness.py, on sys.path through conftest.py

from .conftest import FLUSH_SECONDS


@pytest.fixture(scope="module")
def engine_model(checkpoint_dir):
    return load_model(str(checkpoint_dir), "cpu", "float32")


def make_engine(model, slots: int, frames_per_step: int = 2) -> Engine:
    """``frames_per_step`` 2 by default: the server's on CPU and the tests' reference's (``conftest.Reference``)."""
    return Engine(model, slots, flush_seconds=FLUSH_SECONDS, frames_per_step=frames_per_step).start()


# Streams through the engine from their own threads (scripts/harness.py's Feeder): a random start within 1.5 s,
# chunks from one sample to one second, a pause of up to 0.4 s after one chunk in five (the slot sits out steps).
STREAM = dict(chunks=(1, 100, 960, 1920, 2500, 7000, 24000), pause=(0.2, 0.4), join_within=1.5)


def run_streams(engine: Engine, clips: list[np.ndarray], seed: int = 0) -> list[Feeder]:
    streams = [Feeder(engine, clip, seed + i, **STREAM) for i, clip in enumerate(clips)]
    run_feeders(streams, timeout=300)
    return streams


def streams_through_engine(model, clips: list[np.ndarray], slots: int, frames_per_step: int = 2,
                           seed: int = 0) -> list[Feeder]:
    """Run ``clips`` as concurrent streams (see ``STREAM``) through a fresh engine, stopped afterwards."""
    engine = make_engine(model, slots, frames_per_step)
    try:
        return run_streams(engine, clips, seed)
    finally:
        engine.stop()


def test_concurrent_streams_match_single_stream_reference(engine_model, reference, sounds):
    # 8 streams of different lengths through 5 slots: they join and leave at different times, some wait for a
    # free slot (which is then reused and must be reset), chunking and pauses are random. One frame per step, as
    # on a GPU; the reference then encodes one frame per Mimi call too.
    clips = [sounds(seconds, seed) for seed, seconds in enumerate([0.5, 2.3, 1.1, 3.0, 0.9, 1.7, 2.6, 0.3])]
    streams = streams_through_engine(engine_model, clips, slots=5, frames_per_step=1)
    for stream, clip in zip(streams, clips):
        assert isinstance(stream.end, StreamEnd)
        expected = reference.outputs(clip, mimi_frames_per_call=1)
        assert stream.tokens == [o.token for o in expected]
        assert [o.frame for o in stream.outputs] == list(range(len(expected)))
        got = np.array([o.pauses for o in stream.outputs])
        want = np.array([o.pauses for o in expected])
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_several_frames_per_step_give_the_same_tokens(engine_model, reference, sounds):
    """Stepping 3 frames at a time (cheaper Mimi calls on CPU): the tokens of the reference encoding 3 frames per
    Mimi call (the same codes as 1 or 2 per call but for float noise, see ``reference``)."""
    clips = [sounds(seconds, 200 + i) for i, seconds in enumerate([0.45, 1.3, 2.0, 0.9])]
    streams = streams_through_engine(engine_model, clips, slots=3, frames_per_step=3, seed=5)
    for stream, clip in zip(streams, clips):
        assert isinstance(stream.end, StreamEnd)
        assert stream.tokens == reference.tokens(clip, mimi_frames_per_call=3)


@pytest.mark.slow  # long audio or many connections: `uv run pytest -m slow` (CI runs it)
def test_stream_longer_than_mimi_context_with_several_frames_per_step(engine_model, reference, bria):
    """Past Mimi's 10 s attention context, 2 frames per Mimi call still give the single-stream tokens.

    Found by the soak: with moshi's default KV cache (exactly the context) a multi-step call drops the oldest keys
    early and this clip's tokens differ at frames 124-125; ``attention_cache`` fixes it.
    """
    clip = bria[375441: 375441 + 24000 * 11]  # 11 s of real speech (a soak clip that exposed the bug)
    (stream,) = streams_through_engine(engine_model, [clip], slots=2, frames_per_step=2, seed=9)
    assert stream.tokens == reference.tokens(clip)


def test_a_backlog_steps_in_bigger_mimi_calls_bit_for_bit(engine_model, reference, bria, sounds):
    """A stream whose audio is waiting (here 11 s sent at once, past Mimi's 10 s context) is stepped up to
    ``max_frames_per_step`` frames at a time, beside a neighbour sent in small chunks: both get the reference's
    tokens and VAD probabilities bit for bit (the reference encodes 2 frames per call). Exact on the CPU in the
    batch-invariant mode, with the engine's attention caches in the reference too (``encoder_frames_per_call``)."""
    clip, neighbour = bria[375441: 375441 + 24000 * 11], sounds(2.0, 31)
    engine = make_engine(engine_model, 2)
    assert engine.max_frames_per_step > engine.frames_per_step  # a flush and a step of audio, rounded to steps
    try:
        backlog = Feeder(engine, clip, 0, chunks=(len(clip),))
        paced = Feeder(engine, neighbour, 1, chunks=(1920,), pause=(1.0, 0.12))
        run_feeders([backlog, paced], timeout=300)
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats.frames > 3 * stats.steps  # most steps carried 8 frames of the backlog, not 2
    for stream, audio in ((backlog, clip), (paced, neighbour)):
        expected = reference.outputs(audio)
        assert [(o.frame, o.token, o.pauses) for o in stream.outputs] == \
            [(o.frame, o.token, o.pauses) for o in expected]


@pytest.mark.slow  # long audio or many connections: `uv run pytest -m slow` (CI runs it)
def test_mimi_attention_sees_its_whole_context_whatever_the_call_size(checkpoint_dir, bria):
    """Mimi's encoder latents past its 10 s context are the same for 1 or 2 frames per call (float noise only),
    and the comparison does catch moshi's default cache, which drops keys for multi-step calls."""
    import torch

    from kyutai_stt.engine.kyutai.attention_cache import fit_encoder_attention

    pcm = torch.from_numpy(bria[375441: 375441 + FRAME_SIZE * 150].copy())  # 12 s of speech

    @torch.no_grad()
    def latents(mimi, frames_per_call):
        with mimi.streaming(1):
            chunks = pcm.view(-1, FRAME_SIZE * frames_per_call)
            return torch.cat([mimi.encode_to_latent(c[None, None], quantize=False) for c in chunks], -1)[0]

    def late_difference(mimi):
        a, b = latents(mimi, 1), latents(mimi, 2)
        assert (a[:, :120] - b[:, :120]).abs().max() < 1e-6  # within the context: always the same (float noise)
        difference = float((a[:, 126:] - b[:, 126:]).abs().max())
        print("late latent difference", difference)
        return difference

    mimi = load_model(str(checkpoint_dir), "cpu", "float32").mimi
    assert late_difference(mimi) > 5e-6  # moshi's own cache: the grouping of frames shows after 10 s
    fit_encoder_attention(mimi, 2)
    assert late_difference(mimi) < 1e-6


@pytest.mark.slow  # long audio or many connections: `uv run pytest -m slow` (CI runs it)
def test_mimi_latents_do_not_depend_on_the_call_size_in_the_cpu_mode(checkpoint_dir, bria):
    """What ``max_frames_per_step`` rests on: in the CPU's batch-invariant mode, with the same attention caches,
    Mimi's latents (before quantization) for 11.5 s of speech are bitwise the same whether it is given 2, 4, 8 or
    16 frames per call. Without the mode they are not on the machine this was written on (oneDNN and MKL pick their
    kernels by the call's shape: 2e-8 apart), which is how the comparison was seen to fail."""
    import torch

    from kyutai_stt.engine import batch_invariant
    from kyutai_stt.engine.kyutai.attention_cache import fit_encoder_attention

    pcm = torch.from_numpy(bria[375441: 375441 + FRAME_SIZE * 144].copy())  # 11.5 s, past the 10 s context
    mimi = load_model(str(checkpoint_dir), "cpu", "float32").mimi
    fit_encoder_attention(mimi, 16)

    @torch.no_grad()
    def latents(frames_per_call):
        with mimi.streaming(1):
            chunks = pcm.view(-1, FRAME_SIZE * frames_per_call)
            return torch.cat([mimi.encode_to_latent(c[None, None], quantize=False) for c in chunks], -1)[0]

    with batch_invariant.cpu_mode():
        two = latents(2)
        assert all(torch.equal(two, latents(frames)) for frames in (4, 8, 16))


def test_output_covers_audio_and_flush(engine_model, reference, sounds):
    """The last frames come out: one output per audio frame (last one zero-padded) plus the flush."""
    clip = sounds(1.234, 42)
    (stream,) = streams_through_engine(engine_model, [clip], slots=2)
    expected_frames = -(-len(clip) // FRAME_SIZE) + flush_frame_count(engine_model, FLUSH_SECONDS)
    assert flush_frame_count(engine_model, FLUSH_SECONDS) >= engine_model.delay_frames + 1
    assert len(stream.outputs) == expected_frames == len(reference.outputs(clip))
    assert stream.end.frames == expected_frames


def test_the_checkpoint_listens(reference, sounds):
    a, b = sounds(2.0, 1), sounds(2.0, 2)
    assert reference.tokens(a) != reference.tokens(b)
    # the first frame is heard: changing only the first 80 ms changes the result
    c = a.copy()
    c[:FRAME_SIZE] = np.random.default_rng(0).normal(scale=0.5, size=FRAME_SIZE)
    assert reference.tokens(c) != reference.tokens(a)


def test_first_frame_changes_engine_output_too(engine_model, reference, sounds):
    a = sounds(1.0, 3)
    c = a.copy()
    c[:FRAME_SIZE] = np.random.default_rng(1).normal(scale=0.5, size=FRAME_SIZE)
    sa, sc = streams_through_engine(engine_model, [a, c], slots=2)
    assert sa.tokens == reference.tokens(a)
    assert sc.tokens == reference.tokens(c)
    assert sa.tokens != sc.tokens


def test_parity_check_catches_a_slot_that_is_not_reset(engine_model, reference, sounds, monkeypatch):
    """The parity test can fail: an engine that reuses a slot without resetting it gives other tokens."""
    clips = [sounds(1.0, 7), sounds(1.0, 8)]
    original = Engine._plan

    def plan_without_reset(self):
        plan = original(self)
        plan.reset[:] = False
        return plan

    monkeypatch.setattr(Engine, "_plan", plan_without_reset)
    engine = make_engine(engine_model, slots=1)  # one slot: the second stream reuses the first one's state
    try:
        first = run_streams(engine, clips[:1])[0]
        second = run_streams(engine, clips[1:])[0]
    finally:
        engine.stop()
    assert first.tokens == reference.tokens(clips[0])
    assert second.tokens != reference.tokens(clips[1])


def test_parity_check_catches_a_swallowed_first_frame(engine_model, reference, sounds, monkeypatch):
    """Without the init step the LM never hears the first frame: the result differs from the reference."""
    clip = sounds(1.0, 9)
    clip[:FRAME_SIZE] = np.random.default_rng(2).normal(scale=0.5, size=FRAME_SIZE)  # a first frame that matters
    original = Engine._plan

    def plan_without_init(self):
        plan = original(self)
        for index in np.flatnonzero(plan.init):  # skip the init step: the slot goes straight to its first frame
            slot = plan.targets[index][0]
            slot.take_frame(plan.pcm[index, :FRAME_SIZE])
            plan.audio[index] = True
            plan.deliver[index] = 1
        plan.init[:] = False
        return plan

    monkeypatch.setattr(Engine, "_plan", plan_without_init)
    (stream,) = streams_through_engine(engine_model, [clip], slots=1)
    assert stream.tokens != reference.tokens(clip)


def test_abort_frees_the_slot_and_full_engine_refuses(engine_model, sounds):
    engine = make_engine(engine_model, slots=2)
    try:
        h1 = engine.open(lambda events: None)
        h2 = engine.open(lambda events: None)
        with pytest.raises(NoFreeSlot):
            engine.open(lambda events: None)
        engine.push(h1, sounds(0.5, 1))
        engine.abort(h1)
        assert engine.stats().slots_in_use == 1
        engine.open(lambda events: None)
        assert engine.stats().slots_in_use == 2
        engine.abort(h2)
    finally:
        engine.stop()


@pytest.mark.slow  # long audio or many connections: `uv run pytest -m slow` (CI runs it)
def test_streams_longer_than_the_lm_context(checkpoint_dir, sounds, tmp_path):
    """A long stream wraps the LM's ring KV cache (and runs RoPE past the context): still exact.

    The same weights with a 16-frame context (1.3 s) make a 4 s stream as long, relative to the context, as a
    stream of hours would be for the real 750-frame context; exactness is checked against the reference.
    """
    import json

    from kyutai_stt.engine.kyutai.reference import reference_outputs

    short = tmp_path / "short-context"
    short.mkdir()
    for item in checkpoint_dir.iterdir():
        if item.name != "config.json":
            (short / item.name).symlink_to(item.resolve())
    config = json.loads((checkpoint_dir / "config.json").read_text())
    config["context"] = 16
    (short / "config.json").write_text(json.dumps(config))
    model = load_model(str(short), "cpu", "float32")
    reference_model = load_model(str(short), "cpu", "float32")
    assert model.lm.context == 16
    clips = [sounds(4.0, 301), sounds(3.2, 302)]
    streams = streams_through_engine(model, clips, slots=2, frames_per_step=2, seed=9)
    for stream, clip in zip(streams, clips):
        assert stream.tokens == [o.token for o in reference_outputs(reference_model, clip, FLUSH_SECONDS)]
        assert len(stream.tokens) > 3 * 16
