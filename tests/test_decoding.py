"""Per-stream decoding (issue 20): sampling exact per (seed, step), keyterm boosting, context reset.

Every stream equals the single-stream reference run with the same options, bit for bit on the CPU, whatever its
slot and neighbours; greedy streams beside sampling or boosted ones keep their exact greedy tokens.
"""

from __future__ import annotations

import threading

import pytest

from kyutai_stt.engine.contract import DecodingOptions
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.decoding import gumbel_noise, keyterm_trie
from kyutai_stt.engine.kyutai.engine import Engine

import torch

from harness import Feeder, run_feeders  # scripts/harness.py, on sys.path through conftest.py

from .conftest import FLUSH_SECONDS

STREAM = dict(chunks=(960, 1920, 3840, 7000, 24000), pause=(0.3, 0.2), open_now=True)
SAMPLING = DecodingOptions(temperature=0.5, seed=7)


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_model(str(checkpoint_dir), "cpu", "float32")


def keyterm_for(model, greedy_tokens: list[int]) -> tuple[str, int]:
    """A one-piece word the greedy run never emits."""
    for token in range(4, model.lm.text_card):
        piece = model.tokenizer.id_to_piece(token)
        if piece.startswith("▁") and len(piece) > 3 and token not in greedy_tokens:
            if list(model.tokenizer.encode(piece[1:])) == [token]:
                return piece[1:], token
    raise AssertionError("no candidate keyterm")


def test_gumbel_noise_is_a_function_of_seed_step_and_token_only():
    ids = torch.arange(1000)
    seeds, steps = torch.tensor([7, 7, 8, 2**32 - 1]), torch.tensor([3, 4, 3, 3])
    batch = gumbel_noise(seeds, steps, ids)
    for row in range(4):
        assert torch.equal(batch[row], gumbel_noise(seeds[row:row + 1], steps[row:row + 1], ids)[0])
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[0], batch[2])
    assert torch.isfinite(batch).all()
    # Gumbel(0, 1): mean 0.5772, variance pi^2 / 6
    assert abs(float(batch.mean()) - 0.5772) < 0.05 and abs(float(batch.var()) - 1.645) < 0.15


def test_options_out_of_range_are_refused(model):
    engine = Engine(model, 1, flush_seconds=FLUSH_SECONDS)  # not started: open checks first
    try:
        for bad, words in [(DecodingOptions(temperature=-0.1), "temperature"),
                           (DecodingOptions(temperature=2.5), "temperature"),
                           (DecodingOptions(temperature=0.5, seed=-1), "seed"),
                           (DecodingOptions(keyterms=("x",) * 301), "keyterms"),
                           (DecodingOptions(keyterms=(" ",)), "keyterm")]:
            with pytest.raises(ValueError, match=words):
                engine.open(lambda events: None, options=bad)
    finally:
        engine.stop()  # leaves streaming mode: the module's later engines resize Mimi's caches first


def test_keyterm_trie_shares_prefixes(model):
    edges = keyterm_trie(model.tokenizer, ("zea tri", "zea plea"))
    first = [e for e in edges if e[0] == 0]
    assert len(first) == 1  # both terms enter through the same first piece
    assert len(edges) == 3


@pytest.mark.slow  # engine parity with neighbours over real speech: minutes on 2 cores (CI runs -m slow)
def test_sampling_keyterms_and_reset_equal_the_reference_whatever_the_neighbours(model, bria, reference):
    clip, other, third = (bria[24000 * a: 24000 * (a + 2)].copy() for a in (3, 9, 15))
    greedy = reference.tokens(clip)
    term, term_token = keyterm_for(model, reference.tokens(third))
    boosted = DecodingOptions(keyterms=(term,))

    engine = Engine(model, 5, flush_seconds=FLUSH_SECONDS, frames_per_step=2).start()
    try:
        alone = Feeder(engine, clip, seed=1, options=SAMPLING, **STREAM)
        assert alone.handle.slot == 0 and alone.handle.seed == 7
        run_feeders([alone])

        plain = Feeder(engine, other, seed=2, **STREAM)  # greedy, beside sampling and boosted streams
        keyed = Feeder(engine, third, seed=3, options=boosted, **STREAM)
        twin = Feeder(engine, clip, seed=4, **STREAM)  # the same clip, greedy
        sampled = Feeder(engine, clip, seed=5, options=SAMPLING, delay=0.3, **STREAM)
        assert sampled.handle.slot == 3
        reset = Feeder(engine, clip, seed=6, **STREAM)
        resetter = threading.Timer(1.0, engine.reset, (reset.handle,))
        resetter.start()
        run_feeders([plain, keyed, twin, sampled, reset])
        resetter.join()
    finally:
        engine.stop()

    # sampling: the same seed gives the same tokens (and pause probabilities) in any slot, with any neighbours,
    # and they equal the reference loop's draws; they are not the greedy tokens
    assert sampled.tokens == alone.tokens == reference.tokens(clip, options=SAMPLING)
    assert [o.pauses for o in sampled.outputs] == [o.pauses for o in alone.outputs]
    assert alone.tokens != greedy
    # keyterms: the boosted term appears, as in the reference with the same terms; it never did greedily
    assert keyed.tokens == reference.tokens(third, options=boosted)
    assert term_token in keyed.tokens and term_token not in reference.tokens(third)
    # greedy streams keep their exact greedy tokens beside them
    assert twin.tokens == greedy
    assert plain.tokens == reference.tokens(other)
    # a context reset: the clock goes on (as many outputs), the tokens are the reference's reset at that frame
    assert len(reset.resets) == 1 and 0 < reset.resets[0] < len(reset.outputs)
    assert [o.frame for o in reset.outputs] == list(range(len(greedy)))
    assert reset.tokens == reference.tokens(clip, resets=(reset.resets[0],))


class _Sink:
    def __init__(self):
        self.tokens: list[int] = []
        self.done = threading.Event()

    def __call__(self, events) -> None:
        from kyutai_stt.engine.contract import StepOutput

        for event in events:
            if isinstance(event, StepOutput):
                self.tokens.append(event.token)
            else:
                self.done.set()


@pytest.mark.slow  # engine parity with neighbours over real speech: minutes on 2 cores (CI runs -m slow)
def test_reconfigure_at_a_frame_equals_the_reference_with_that_change(model, bria, reference):
    """``Engine.reconfigure`` (Realtime's session.update): before any audio it is as if opened with the options;
    mid-stream the options start at the given frame however late the call comes, as in the reference's
    ``changes``; a greedy neighbour keeps its exact tokens."""
    import time

    from kyutai_stt.audio.constants import FRAME_SIZE

    clip, third = bria[24000 * 3: 24000 * 5].copy(), bria[24000 * 15: 24000 * 17].copy()
    term, term_token = keyterm_for(model, reference.tokens(third))
    boosted = DecodingOptions(keyterms=(term,))
    half = FRAME_SIZE * 12 + 500  # mid-frame: the change starts at the next frame
    frame = -(-half // FRAME_SIZE)

    engine = Engine(model, 3, flush_seconds=FLUSH_SECONDS, frames_per_step=2).start()
    sinks = [_Sink() for _ in range(3)]
    try:
        early, late, plain = (engine.open(sink) for sink in sinks)
        engine.reconfigure(early, boosted, 0)  # before any audio: from the start
        engine.push(early, third)
        engine.push(late, clip[:half])
        engine.push(plain, clip)
        time.sleep(1.0)  # the engine has stepped all the whole frames it has: the change still starts at `frame`
        engine.reconfigure(late, SAMPLING, frame)
        engine.push(late, clip[half:])
        for handle in (early, late, plain):
            engine.close(handle)
        assert all(sink.done.wait(60) for sink in sinks)
    finally:
        engine.stop()
    assert sinks[0].tokens == reference.tokens(third, options=boosted)
    assert term_token in sinks[0].tokens and term_token not in reference.tokens(third)
    want = reference.tokens(clip, changes=((frame, SAMPLING),))
    assert sinks[1].tokens == want
    assert want[:frame] == reference.tokens(clip)[:frame] and want != reference.tokens(clip)
    assert sinks[2].tokens == reference.tokens(clip)
