"""NVIDIA's family (engine/nemo): a stream's tokens equal NeMo's own batch-1 streaming loop whatever its slot,
neighbours and join time, and the server serves it through the protocols with the same words.

A tiny random-weight cache-aware CTC checkpoint (``make-checkpoint --family nemo``) is made once per run, or reused
from ``KYUTAI_STT_TEST_NEMO_CHECKPOINT``.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from pathlib import Path

import numpy as np
import openai
import pytest

pytest.importorskip("nemo.collections.asr")

from kyutai_stt.client import Client  # noqa: E402
from kyutai_stt.engine.contract import StepOutput, StreamEnd  # noqa: E402
from kyutai_stt.engine.nemo.checkpoint import load_model, make_checkpoint  # noqa: E402
from kyutai_stt.engine.nemo.engine import PADDING, TOKEN_OFFSET, Engine  # noqa: E402
from kyutai_stt.engine.nemo.reference import reference_labels, reference_tokens  # noqa: E402
from kyutai_stt.messages.events import Word, WordEnd  # noqa: E402
from kyutai_stt.settings import Settings  # noqa: E402
from kyutai_stt.stream.words import WordAssembler, pair_words  # noqa: E402

from .conftest import RunningServer, free_port  # noqa: E402
from .helpers import words_of  # noqa: E402
from .test_protocols import wav_bytes  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: the tiny model's small products gain nothing from two, and on a
    loaded 2-core machine OpenMP's spinning threads made each step 17x slower (results are the same)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def checkpoint(tmp_path_factory, head: str) -> Path:
    """A tiny random checkpoint with a CTC or RNNT head, made once per run (or kept in
    ``$KYUTAI_STT_TEST_NEMO_CHECKPOINT`` for CTC, that folder + "-rnnt" for RNNT)."""
    cached = os.environ.get("KYUTAI_STT_TEST_NEMO_CHECKPOINT")
    if cached:
        folder = Path(cached + ("-rnnt" if head == "rnnt" else ""))
        if not (folder / "model.nemo").exists():
            make_checkpoint(folder, "tiny", head=head)
        return folder
    return make_checkpoint(tmp_path_factory.mktemp("nemo") / head, "tiny", head=head)


@pytest.fixture(scope="session")
def nemo_dir(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory, "ctc")


@pytest.fixture(scope="session")
def nemo_model(nemo_dir):
    return load_model(str(nemo_dir), "cpu", "float32")


@pytest.fixture(scope="session")
def rnnt_model(tmp_path_factory):
    return load_model(str(checkpoint(tmp_path_factory, "rnnt")), "cpu", "float32")


def expected_tokens(model, pcm: np.ndarray) -> list[int]:
    """The contract's tokens for NeMo's reference labels (CTC): blank or a repeat is padding, else the piece."""
    blank = model.asr.decoder.num_classes_with_blank - 1
    tokens, previous = [], blank
    for label in reference_labels(model, pcm):
        tokens.append(PADDING if label in (blank, previous) else label + TOKEN_OFFSET)
        previous = label
    return tokens


def wait_for(condition, timeout: float = 60.0) -> None:
    """Let the engine catch up (a real pause or join in engine time, not just in push order)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the engine did not catch up"
        time.sleep(0.005)


class Collector:
    def __init__(self):
        self.tokens: list[int] = []
        self.frames: list[list[int]] = []  # every token of each frame (RNNT may emit several)
        self.done = threading.Event()

    def __call__(self, events):
        for event in events:
            if isinstance(event, StepOutput):
                self.tokens.append(event.token)
                self.frames.append(([event.token] if event.token != PADDING else []) + list(event.more_tokens))
            elif isinstance(event, StreamEnd):
                self.done.set()


def test_stream_equals_nemo_reference_whatever_its_slot_neighbours_and_join(nemo_model, bria):
    """The parity and neighbour-invariance proof: 6 s of speech in slot 2 of 4, fed in random pieces, while two
    neighbours join at other times, pause and leave, gives NeMo's own batch-1 streaming labels token for token; so
    does the same stream alone in slot 0 (bit-identical tokens)."""
    rng = random.Random(3)
    main = bria[: 24000 * 6 + 777]  # a partial last frame and a partial last chunk
    other_a, other_b = bria[24000 * 8: 24000 * 11], bria[24000 * 12: 24000 * 16 + 100]
    want = expected_tokens(nemo_model, main)
    assert sum(t != PADDING for t in want) > 20  # the random model's labels do change: the check bites
    engine = Engine(nemo_model, 4)
    engine.warmup()
    engine.start()
    try:
        alone = Collector()
        handle = engine.open(alone)
        engine.push(handle, main)
        engine.close(handle)
        assert alone.done.wait(120)
        assert alone.tokens == want

        # slots 0 and 1 taken first, so the stream lands in slot 2; the first neighbour runs out of audio and
        # pauses (its slot idle while the others step), the second joins mid-stream, in engine time
        sinks = [Collector() for _ in range(3)]
        first = engine.open(sinks[0])
        engine.push(first, other_a[:24000])
        holder = engine.open(Collector())
        handles = [first, None, engine.open(sinks[2])]
        assert handles[2].slot == 2
        engine.abort(holder)  # slot 1 frees: the second neighbour joins there later
        wait_for(lambda: len(sinks[0].tokens) >= 10)  # 12 frames pushed; the last chunk waits for its look-ahead
        position, step = 0, 0
        while position < len(main):
            size = rng.choice([480, 1920, 5000, 7777])
            engine.push(handles[2], main[position:position + size])
            position += size
            step += 1
            if step == 10:
                wait_for(lambda: len(sinks[2].tokens) >= 8)
                handles[1] = engine.open(sinks[1])
                engine.push(handles[1], other_b)
            if step == 20:
                wait_for(lambda: len(sinks[2].tokens) >= 30)
                engine.push(first, other_a[24000:])
                engine.close(first)
        engine.close(handles[1])
        engine.close(handles[2])
        assert all(s.done.wait(120) for s in sinks)
        assert sinks[2].tokens == want
        assert sinks[0].tokens == expected_tokens(nemo_model, other_a)
        assert sinks[1].tokens == expected_tokens(nemo_model, other_b)
    finally:
        engine.stop()


def test_rnnt_stream_equals_nemo_reference_with_neighbours(rnnt_model, bria):
    """RNNT: several tokens per frame (``StepOutput.more_tokens``); a stream in slot 1 while a neighbour in slot 0
    pauses and another joins mid-stream gets NeMo's batch-1 streaming hypothesis, each token at its frame."""
    main, other_a, other_b = bria[: 24000 * 4 + 555], bria[24000 * 8: 24000 * 10], bria[24000 * 12: 24000 * 14]
    want = reference_tokens(rnnt_model, main)
    assert sum(len(f) > 1 for f in want) > 5  # frames with several tokens: the contract's extension is exercised
    engine = Engine(rnnt_model, 3)
    engine.warmup()
    engine.start()
    try:
        sinks = [Collector() for _ in range(3)]
        first = engine.open(sinks[0])
        engine.push(first, other_a[:24000])
        handle = engine.open(sinks[1])
        assert handle.slot == 1
        wait_for(lambda: len(sinks[0].tokens) >= 10)  # the neighbour pauses
        engine.push(handle, main[: 24000 * 2])
        wait_for(lambda: len(sinks[1].tokens) >= 12)
        late = engine.open(sinks[2])  # joins mid-stream
        engine.push(late, other_b)
        engine.push(handle, main[24000 * 2:])
        engine.push(first, other_a[24000:])
        for h in (first, handle, late):
            engine.close(h)
        assert all(s.done.wait(120) for s in sinks)
        assert sinks[1].frames == want
        assert sinks[0].frames == reference_tokens(rnnt_model, other_a)
        assert sinks[2].frames == reference_tokens(rnnt_model, other_b)
    finally:
        engine.stop()


def test_piece_words():
    """NeMo's words: a "▁" piece starts a word; padding between a word's pieces does not split it."""
    pieces = ("<b>", "<pad>", "▁hel", "lo", "▁wor", "ld", "▁")
    assembler = WordAssembler(pieces.__getitem__, 0, 12.5, 1, 0, 2, piece_starts_word=True)
    events = []
    for frame, token in enumerate([1, 2, 1, 1, 3, 1, 4, 5, 1, 1]):
        events += assembler.feed(frame, token)
    events += assembler.finish(10)
    words = [(w.text, w.start, w.end) for w in pair_words(e for e in events if isinstance(e, (Word, WordEnd)))]
    assert words == [("hello", 0.08, 0.4), ("world", 0.48, 0.8)]


def test_reader_reads_every_token_of_a_frame():
    """The one words path: a frame's ``more_tokens`` give the same events as the tokens one frame each."""
    from kyutai_stt.engine.contract import ModelInfo
    from kyutai_stt.stream.reader import OutputReader

    info = ModelInfo(name="t", family="nemo", pieces=("<b>", "<pad>", "▁hel", "lo", "▁wor", "ld"),
                     first_piece_token=2, padding_token=1, boundary_token=0, sample_rate=24000, frame_size=1920,
                     delay_frames=0, prefix_frames=0, frames_per_step=2, flush_frames=0, word_start="piece")
    together, apart = OutputReader(info), OutputReader(info)
    one = [e for e in together.step(StepOutput(0, 2, None, 0, more_tokens=(3, 4)), 0) if isinstance(e, (Word, WordEnd))]
    one += [e for e in together.step(StepOutput(1, 5, None, 0), 0) if isinstance(e, (Word, WordEnd))]
    one += together.end(StreamEnd(2))
    two = []
    for token in (2, 3, 4):
        two += [e for e in apart.words.feed(0, token) if isinstance(e, (Word, WordEnd))]
    two += [e for e in apart.words.feed(1, 5) if isinstance(e, (Word, WordEnd))]
    two += apart.end(StreamEnd(2))
    assert one == two and [w.text for w in one if isinstance(w, Word)] == ["hello", "world"]


@pytest.fixture(scope="module")
def nemo_server(nemo_dir):
    from kyutai_stt.engine.startup import load
    from kyutai_stt.serve.server import create_app

    settings = Settings(model=str(nemo_dir), device="cpu", dtype="float32", slots=4)
    with RunningServer(create_app(settings, load(settings)), free_port()) as running:
        yield running


async def test_server_serves_the_nemo_family(nemo_server, nemo_model, bria):
    """/status names the family; the events WebSocket (two streams at once) and OpenAI's SDK give the reference's
    words."""
    import httpx

    pcm = bria[: 24000 * 4]
    info = nemo_server.engine.info
    assembler = WordAssembler.for_model(info)
    assembler.audio_end = len(pcm) / 24000
    events = []
    for frame, token in enumerate(expected_tokens(nemo_model, pcm)):
        events += assembler.feed(frame, token)
    events += assembler.finish(-(-len(pcm) // 1920))
    want = [(w.text, round(w.start, 4), round(w.end, 4))
            for w in pair_words(e for e in events if isinstance(e, (Word, WordEnd)))]
    assert want
    async with httpx.AsyncClient() as client:
        status = (await client.get(nemo_server.http + "/status")).json()
    assert status["family"] == "nemo" and status["slots_total"] == 4

    async def via_events(chunk):
        return words_of([e async for e in Client(nemo_server.ws).stream(pcm, chunk_samples=chunk)])

    async def via_openai():
        client = openai.AsyncOpenAI(base_url=nemo_server.http + "/v1", api_key="unused", timeout=600)
        result = await client.audio.transcriptions.create(
            model="nemo", file=("a.wav", wav_bytes(pcm)), response_format="verbose_json",
            timestamp_granularities=["word"])
        return [(w.word, round(w.start, 4), round(w.end, 4)) for w in result.words]

    async def via_kyutai():  # moshi-server's msgpack protocol, through our client
        events = [e async for e in Client(nemo_server.ws, "kyutai").stream(pcm)]
        return [(e.text, round(e.start_time, 4)) for e in events if isinstance(e, Word)]

    results = await asyncio.gather(via_events(5000), via_events(1234), via_openai(), via_kyutai())
    assert results[0] == results[1] == results[2] == want
    # moshi-server's protocol has no flush: the words before its end marker are a prefix of the flushed ones
    assert results[3] and results[3] == [(w[0], w[1]) for w in want][:len(results[3])]
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(nemo_server.http + "/metrics")).text
    frames = [line for line in metrics.splitlines() if line.startswith("kyutai_stt_frames_processed_total")]
    assert frames and float(frames[0].split()[-1]) >= 4 * 50  # four streams of 50 frames were transcribed


# Deepgram live + Finalize on the NeMo family: tests/test_protocol_families.py::test_deepgram_live_finalize[nemo]
# (the finalize closes the word in progress; its expectation reads the audio as two streams, as the server does)
