"""The minimal, acknowledged finalize (``stream.flush.flush_now``): a mid-stream finalize at a cut gives exactly the
words and times of a stream that ends there, however many finalizes came before, and its marker comes only once
the word in progress is closed.

Random weights do not respect the model's delay, so equality is defined where it is a computation: the model is
causal, so the tokens up to the end of a finalize's flush are those of a stream that ends at the cut; the words of a
finalize are those a fresh word assembler makes of the tokens since the previous one, closed at the cut, with the
flush silences taken out of the times (``Timeline``).
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE
from kyutai_stt.client import Client
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.engine import Engine, flush_frame_count
from kyutai_stt.engine.kyutai.reference import reference_outputs
from kyutai_stt.messages.events import End, Flushed, Marker, Word, WordEnd, parse_event
from kyutai_stt.stream.flush import Timeline, flush_now
from kyutai_stt.stream.session import Session
from kyutai_stt.stream.words import WordAssembler, pair_words

from .conftest import FLUSH_SECONDS
from .helpers import ref_words, words_of


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_model(str(checkpoint_dir), "cpu", "float32")


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, 4, frames_per_step=2).start()  # the default flush: the minimal one
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def clips(bria, speech):
    return {"bria": bria, "espeak": speech}


def words(events, timeline: Timeline) -> list[tuple[str, float, float]]:
    """(text, start, end) in client time, rounded to 1 us."""
    return [(w.text, round(timeline.client_time(w.start), 6), round(timeline.client_time(w.end), 6))
            for w in pair_words(e for e in events if isinstance(e, (Word, WordEnd)))]


async def stream(engine, pieces: list[np.ndarray], finalize: bool) -> tuple[list[list], Timeline]:
    """Send ``pieces`` with a finalize after each but the last (``finalize``), then end. Returns the events split
    at each finalize's marker, and the timeline."""
    session, timeline = Session(engine), Timeline()
    session.start()
    for i, piece in enumerate(pieces):
        session.push_pcm(piece)
        if finalize and i < len(pieces) - 1:
            flush_now(session, i, timeline)
    session.end()
    segments: list[list] = [[]]
    async for event in session:
        if isinstance(event, Marker):
            assert event.id == len(segments) - 1  # in order, one per finalize
            segments.append([])
        elif not isinstance(event, End):
            segments[-1].append(event)
    return segments, timeline


def heard_audio(pieces: list[np.ndarray], timeline: Timeline) -> np.ndarray:
    """What the model heard: the pieces with each finalize's silence (its frame padding included) after them."""
    parts = []
    for piece, (_, length) in zip(pieces, timeline.inserted + [(0.0, 0.0)]):
        parts += [piece, np.zeros(round(length * SAMPLE_RATE), np.float32)]
    return np.concatenate(parts)


def expected_segments(model, reference, pieces, timeline: Timeline) -> list[list[tuple[str, float, float]]]:
    """The words of each finalize from the reference loop: a fresh word assembler over the tokens from the end of
    the previous flush to the end of this one, closed there; times in client time."""
    heard = heard_audio(pieces, timeline)
    outputs = reference_outputs(reference.model, heard)  # the default flush, as the engine's
    ends, samples = [], 0
    for piece, (_, length) in zip(pieces, timeline.inserted):
        samples += piece.size
        frames = -(-samples // FRAME_SIZE)
        ends.append(model.prefix_frames + frames + flush_frame_count(model))  # the end of this flush
        samples += round(length * SAMPLE_RATE)
    ends.append(len(outputs))
    out, begin = [], 0
    for end in ends:
        assembler = WordAssembler(model.tokenizer.id_to_piece, model.delay_frames + model.prefix_frames)
        assembler.audio_end = heard.size / SAMPLE_RATE
        events = [e for o in outputs[begin:end] for e in assembler.feed(o.frame, o.token)]
        events += assembler.finish(end)
        out.append(words(events, timeline))
        begin = end
    return out


def cut(clip: np.ndarray, fractions: list[float]) -> list[np.ndarray]:
    points = sorted({int(f * clip.size) for f in fractions} | {0, clip.size})
    return [clip[a:b] for a, b in zip(points, points[1:]) if b > a]


CLIPS = dict(name=st.sampled_from(["bria", "espeak"]), offset=st.floats(0, 0.8), seconds=st.floats(1.2, 3.0),
             cuts=st.lists(st.floats(0.05, 0.95), min_size=1, max_size=3))
QUICK = settings(max_examples=2, deadline=None, phases=[Phase.explicit, Phase.generate],
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@QUICK
@given(**CLIPS)
def test_finalizes_give_the_words_of_a_stream_that_ends_there(engine, model, reference, clips, name, offset,
                                                               seconds, cuts):
    check_finalizes(engine, model, reference, clips[name], offset, seconds, cuts)


@pytest.mark.slow  # more clips and cuts: `uv run pytest -m slow` (CI runs it)
@settings(QUICK, max_examples=25)
@given(**CLIPS)
def test_finalizes_give_the_words_of_a_stream_that_ends_there_on_many_cuts(engine, model, reference, clips, name,
                                                                            offset, seconds, cuts):
    check_finalizes(engine, model, reference, clips[name], offset, seconds, cuts)


def check_finalizes(engine, model, reference, clip, offset, seconds, cuts):
    start = int(offset * (clip.size - 4 * SAMPLE_RATE))
    clip = clip[start:start + int(seconds * SAMPLE_RATE)].copy()
    pieces = cut(clip, cuts)

    async def run():
        # the finalizing stream and, beside it, a stream of the first piece alone that ends there
        return await asyncio.gather(stream(engine, pieces, True), stream(engine, pieces[:1], False))

    (segments, timeline), (ended, plain) = asyncio.run(run())
    assert len(segments) == len(pieces)
    # the first finalize gives exactly what the end of a stream gives, word for word and time for time
    assert words(segments[0], timeline) == words(ended[0], plain)
    # every finalize, however many came before, as the reference computes it
    assert [words(s, timeline) for s in segments] == expected_segments(model, reference, pieces, timeline)
    # a finalize closes its words: nothing after it starts before the audio it covered
    at = 0.0
    for segment, piece in zip(segments, pieces):
        found = words(segment, timeline)
        assert all(at - 1e-6 <= start <= end <= at + piece.size / SAMPLE_RATE + 1e-6 for _, start, end in found), \
            (at, piece.size / SAMPLE_RATE, found)
        at += piece.size / SAMPLE_RATE


async def test_a_finalize_tells_the_engine_which_frame_its_client_awaits(engine, model, sounds, monkeypatch):
    """A finalize asks the engine to step first (``Engine.expedite``) exactly the frames its words need: the silence
    prefix, the audio so far and the flush, where the reference's words of the cut end; its marker then comes."""
    asked, expedite = [], engine.expedite

    def seen(handle, frame):
        asked.append(frame)
        expedite(handle, frame)
    monkeypatch.setattr(engine, "expedite", seen)
    session = Session(engine)
    session.start()
    pcm = sounds(1.3, 81)
    session.push_pcm(pcm)
    flush_now(session, 0, Timeline())
    session.end()
    events = [event async for event in session]
    assert asked == [model.prefix_frames + -(-pcm.size // FRAME_SIZE) + flush_frame_count(model)]
    assert any(isinstance(e, Marker) for e in events)


def test_the_flush_is_the_delay_plus_one_frame(model, engine):
    """Frames of silence per finalize: the model's delay plus one (before: delay + 7 + the delay again + 1)."""
    assert engine.info.flush_frames == flush_frame_count(model) == model.delay_frames + 1
    assert flush_frame_count(model, 0.5) == model.delay_frames + 7  # a larger flush_seconds still means more


# ----------------------------------------------------------------------------- the `flush` control of /v1/stream
def flushed_stream_words(reference, pieces: list[np.ndarray]):
    """What ``/v1/stream`` must send for ``pieces`` with a ``flush`` after each but the last, then ``end``: the
    server hears each piece, the audio so far zero-padded to a frame, the flush's silence (the delay +
    ``flush_seconds``, filled to a whole step of 2 frames, the CPU's), and the next piece. Returns the words of each
    flush (a fresh word assembler over the reference's tokens from the end of the previous flush to the end of this
    one, closed there) and of the rest, in client time, and the client's audio time at each flush."""
    model = reference.model
    flush = flush_frame_count(model, FLUSH_SECONDS)
    parts, inserted, ends, ats, samples, client, frames_then = [], [], [], [], 0, 0, 0
    for piece in pieces[:-1]:
        parts.append(piece)
        ats.append((client + piece.size) / SAMPLE_RATE)
        if not piece.size:  # nothing since the last flush (or the start): nothing fed, the frames there stepped
            ends.append(frames_then)
            continue
        samples, client = samples + piece.size, client + piece.size
        pad = -samples % FRAME_SIZE
        end = (samples + pad) // FRAME_SIZE + model.prefix_frames + flush  # the end of this flush, in frames
        silence = pad + (flush + -end % 2) * FRAME_SIZE
        parts.append(np.zeros(silence, np.float32))
        inserted.append((client / SAMPLE_RATE, silence / SAMPLE_RATE))
        ends.append(end)  # its marker: the words of the audio, the flush's tail (filling a step) after it
        frames_then = end + -end % 2
        samples += silence
    heard = np.concatenate(parts + [pieces[-1]])
    timeline = Timeline(inserted)
    outputs = reference.outputs(heard)
    segments, begin = [], 0
    for end in ends + [len(outputs)]:
        assembler = WordAssembler(model.tokenizer.id_to_piece, model.delay_frames + model.prefix_frames)
        assembler.audio_end = heard.size / SAMPLE_RATE
        events = [e for o in outputs[begin:end] for e in assembler.feed(o.frame, o.token)] + assembler.finish(end)
        segments.append([(t, round(s, 4), round(e, 4)) for t, s, e in words(events, timeline)])
        begin = end
    return segments, ats


def split_at_flushes(events) -> tuple[list[list[tuple[str, float, float]]], list]:
    """The words received before each ``Flushed`` and after the last, and the ``Flushed`` events."""
    segments, flushed, current = [], [], []
    for event in events:
        if isinstance(event, Flushed):
            segments.append(words_of(current))
            flushed.append(event)
            current = []
        else:
            current.append(event)
    return segments + [words_of(current)], flushed


async def test_flush_control_gives_every_word_so_far_and_the_stream_goes_on(server, reference, bria, sounds):
    """Our client's ``flush()`` at two cuts of real speech: the words up to the first ``flushed`` are the file
    mode's for the audio so far; every later word is the reference's for the stream with those flushes in it,
    in the client's time; a neighbour stream keeps its exact words."""
    clip = bria[int(3.1 * SAMPLE_RATE):int(5.7 * SAMPLE_RATE)].copy()
    pieces = [clip[:27_000], clip[27_000:46_777], clip[46_777:]]
    neighbour = sounds(1.8, 93)

    async def flushing() -> list:
        events = []
        async with Client(server.ws).open() as live:
            for piece in pieces[:-1]:
                for chunk in range(0, piece.size, 5000):
                    await live.send(piece[chunk:chunk + 5000])
                events += await live.flush()
            await live.send(pieces[-1])
            events += await live.end()
        return events

    events, beside = await asyncio.gather(flushing(), collect(Client(server.ws).stream(neighbour, realtime=True)))
    segments, flushed = split_at_flushes(events)
    want, ats = flushed_stream_words(reference, pieces)
    assert segments[0] == ref_words(reference, pieces[0])  # the first flush: the file mode of the audio so far
    assert segments == want
    assert [f.id for f in flushed] == [1, 2] and [f.audio_seconds for f in flushed] == pytest.approx(ats, abs=1e-6)
    assert events[-1].duration == pytest.approx(clip.size / SAMPLE_RATE, abs=1e-6)  # flush silence not counted
    assert words_of(beside) == ref_words(reference, neighbour)


async def collect(stream) -> list:
    return [event async for event in stream]


async def test_flush_on_an_empty_stream_and_twice_in_a_row(server, reference, sounds):
    """Over the raw ``websockets`` package: a flush before any audio is answered at 0 s; two flushes with nothing
    between them, the second without an id (``id`` null); the words as the reference gives them. A flush with no
    audio since the last one (or before any) feeds nothing: no words, and the model never hears a silence for it.
    A marker right after a flush, and a flush after it, come back before any more audio is sent."""
    first, second = sounds(1.3, 94), sounds(1.1, 95)
    nothing = np.zeros(0, np.float32)
    pieces = [nothing, first, nothing, nothing, second]
    received = []
    async with websockets.connect(server.ws + "/v1/stream?format=pcm_f32le&sample_rate=24000") as ws:
        async def read_until(kind: str) -> None:
            async for message in ws:
                received.append(json.loads(message))
                if received[-1]["type"] == kind:
                    return

        await ws.send(json.dumps({"type": "flush", "id": 7}))
        await read_until("flushed")
        await ws.send(first.tobytes())
        await ws.send(json.dumps({"type": "flush", "id": 8}))
        await ws.send(json.dumps({"type": "flush"}))
        await ws.send(json.dumps({"type": "marker", "id": 9}))
        await ws.send(json.dumps({"type": "flush", "id": 10}))
        await asyncio.wait_for(read_until("flushed"), 120)  # 8
        await asyncio.wait_for(read_until("flushed"), 120)  # null
        await asyncio.wait_for(read_until("flushed"), 120)  # 10, after marker 9: none waits for more audio
        await ws.send(second.tobytes())
        await ws.send(json.dumps({"type": "end"}))
        await read_until("end")
    flushes = [e for e in received if e["type"] == "flushed"]
    assert [(e["id"], e.keys()) for e in flushes] == [(i, {"type", "id", "audio_seconds"}) for i in (7, 8, None, 10)]
    assert [e["audio_seconds"] for e in flushes] == pytest.approx([0.0] + [first.size / SAMPLE_RATE] * 3, abs=1e-6)
    assert [e["id"] for e in received if e["type"] in ("marker", "flushed")][2:] == [None, 9, 10]
    segments, _ = split_at_flushes([parse_event(json.dumps(e)) for e in received])
    want, _ = flushed_stream_words(reference, pieces)
    assert segments == want
    assert segments[0] == segments[2] == segments[3] == [] and segments[1]  # the flushes with nothing new: no words
    assert received[-1]["duration"] == pytest.approx((first.size + second.size) / SAMPLE_RATE, abs=1e-6)


@pytest.mark.slow  # two more slots' worth of compute; the mono tests above cover the control by default
async def test_flush_on_a_multichannel_stream_closes_each_channel_word(server, reference, sounds):
    """``multichannel=true``: a flush finalizes every channel (each its own words, as that channel flushed alone)."""
    left, right = sounds(1.5, 96), sounds(1.5, 97)
    cut = 21_000
    received = []
    async with websockets.connect(server.ws + "/v1/stream?format=pcm_f32le&sample_rate=24000&channels=2"
                                  "&multichannel=true") as ws:
        await ws.send(np.stack([left[:cut], right[:cut]]).T.astype("<f4").tobytes())
        await ws.send(json.dumps({"type": "flush", "id": 3}))
        await ws.send(np.stack([left[cut:], right[cut:]]).T.astype("<f4").tobytes())
        await ws.send(json.dumps({"type": "end"}))
        async for message in ws:
            received.append(parse_event(message))
    assert [(e.id, e.audio_seconds) for e in received if isinstance(e, Flushed)] == [(3, cut / SAMPLE_RATE)]
    for channel, pcm in enumerate((left, right)):
        mine = [e for e in received if isinstance(e, Flushed) or getattr(e, "channel", None) == channel]
        want, _ = flushed_stream_words(reference, [pcm[:cut], pcm[cut:]])
        assert split_at_flushes(mine)[0] == want and want[0] == ref_words(reference, pcm[:cut])
