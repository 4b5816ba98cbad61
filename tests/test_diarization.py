"""Streaming speaker diarization (tiny random-weight Sortformer, NeMo): a stream's activities equal its batch-1 run
whatever its neighbours and join time (the documented bound), and words carry the speaker of their span through
our client (``/v1/stream?diarize=true``) and Deepgram's real SDK (``diarize=true``), a neighbour keeping its exact
words and speakers. NeMo's import alone takes ~10-60 s: the module is marked slow (CI runs it)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

pytest.importorskip("nemo.collections.asr")

from deepgram import AsyncDeepgramClient  # noqa: E402
from deepgram.environment import DeepgramClientEnvironment  # noqa: E402
from deepgram.listen.v1.types import ListenV1Results  # noqa: E402

from kyutai_stt.audio.constants import FRAME_SIZE  # noqa: E402
from kyutai_stt.client import Client  # noqa: E402
from kyutai_stt.engine.diarization.contract import SpeakerFrames  # noqa: E402
from kyutai_stt.engine.diarization.sortformer import SortformerDiarizer, load_sortformer  # noqa: E402
from kyutai_stt.messages.events import Word, WordEnd  # noqa: E402
from kyutai_stt.stream.speakers import word_speaker  # noqa: E402
from kyutai_stt.stream.words import pair_words  # noqa: E402

from .conftest import FLUSH_SECONDS, RunningServer, free_port  # noqa: E402
from .helpers import expected_words  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "diarize-key"
BOUND = 1e-4  # a row in a batch vs alone: other batch shapes, other kernels (measured 1.2e-5 with the sharpened
# random output layers, 6e-8 without)


@pytest.fixture(scope="module")
def diarizer():
    running = SortformerDiarizer(load_sortformer("random:tiny"), name="random:tiny")
    yield running
    running.stop()


def diarize(diarizer, clips: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
    """Each clip's activities, the clips fed together in 80 ms pieces, clip i starting ``delay`` pieces late."""
    activity = [[] for _ in clips]
    finished = threading.Semaphore(0)

    def sink(i):
        def take(events):
            for event in events:
                if isinstance(event, SpeakerFrames):
                    activity[i] += event.probabilities
                else:
                    finished.release()
        return take

    handles = [diarizer.open(sink(i)) for i in range(len(clips))]
    pieces = max(len(pcm) // FRAME_SIZE + 1 + delay for pcm, delay in clips)
    for k in range(pieces + 1):
        for handle, (pcm, delay) in zip(handles, clips):
            j = k - delay
            if 0 <= j * FRAME_SIZE < len(pcm):
                diarizer.push(handle, pcm[j * FRAME_SIZE:(j + 1) * FRAME_SIZE])
            elif j * FRAME_SIZE >= len(pcm):
                diarizer.close(handle)
        if k % 6 == 0:
            threading.Event().wait(0.01)  # let the worker step while others still feed: rows of different ages
    for _ in clips:
        assert finished.acquire(timeout=120)
    return [np.asarray(a, np.float32) for a in activity]


def test_a_stream_joining_mid_batch_matches_its_batch_1_run(diarizer, sounds):
    clips = [sounds(3.0, 501), sounds(2.4, 502), sounds(4.0, 503)]
    alone = [diarize(diarizer, [(pcm, 0)])[0] for pcm in clips]
    together = diarize(diarizer, [(clips[0], 0), (clips[1], 7), (clips[2], 13)])
    for a, b in zip(alone, together):
        assert a.shape == b.shape and a.shape[0] > 0
        assert np.abs(a - b).max() <= BOUND
        assert np.array_equal(a.argmax(1), b.argmax(1))


def test_word_speaker_takes_the_most_active_speaker_over_the_span():
    activity = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.7, 0.3]], np.float32)
    assert word_speaker(activity, 0.08, -0.08, 0.0, 0.16) == 1  # frames 1 and 2
    assert word_speaker(activity, 0.08, -0.08, -0.08, 0.0) == 0  # frame 0
    assert word_speaker(activity, 0.08, -0.08, 0.17, 0.17) == 0  # shorter than a frame: the frame of its middle
    assert word_speaker(activity, 0.08, -0.08, 5.0, 6.0) == 0  # nothing labelled there


@pytest.fixture(scope="module")
def served(checkpoint_dir, diarizer):
    from kyutai_stt.engine.kyutai.checkpoint import load_model
    from kyutai_stt.serve.server import create_app
    from kyutai_stt.settings import Settings

    settings = Settings(model=str(checkpoint_dir), device="cpu", dtype="float32", flush_seconds=FLUSH_SECONDS,
                        slots=4, api_keys=[KEY])
    app = create_app(settings, load_model(str(checkpoint_dir), "cpu", "float32"), diarizer=diarizer)
    with RunningServer(app, free_port()) as running:
        yield running


def expected(reference, diarizer, pcm) -> list[tuple[str, float, float, int]]:
    """The reference's words, each with the speaker of its span in the diarizer's batch-1 activities."""
    activity = diarize(diarizer, [(pcm, 0)])[0]
    info = diarizer.info
    return [(w.text, round(w.start, 4), round(w.end, 4),
             word_speaker(activity, info.frame_seconds, info.offset_seconds, w.start, w.end))
            for w in expected_words(reference.model, reference.outputs(pcm))]


def spoken(events) -> list[tuple[str, float, float, int]]:
    words = [e for e in events if isinstance(e, Word)]
    paired = pair_words(e for e in events if isinstance(e, (Word, WordEnd)))
    return [(p.text, round(p.start, 4), round(p.end, 4), w.speaker) for p, w in zip(paired, words)]


async def test_client_words_carry_the_speaker_of_their_span(served, diarizer, reference, sounds):
    first, second = sounds(2.4, 511), sounds(2.0, 512)
    client = Client(served.ws, api_key=KEY)

    async def run(pcm, delay):
        await asyncio.sleep(delay)
        return [e async for e in client.stream(pcm, chunk_samples=1000, diarize=True)]

    got_first, got_second, plain = await asyncio.gather(run(first, 0), run(second, 0.3),
                                                        client_plain(client, sounds(1.6, 513)))
    want = expected(reference, diarizer, first)
    assert want and spoken(got_first) == want
    assert len({w[3] for w in want}) > 1  # the speakers change: a wrong span or frame offset would show
    assert spoken(got_second) == expected(reference, diarizer, second)
    assert all(e.speaker is None for e in plain if isinstance(e, Word))  # not asked: no speaker


async def client_plain(client, pcm):
    return [e async for e in client.stream(pcm, chunk_samples=1000)]


async def test_deepgram_sdk_diarize_words_speaker(served, diarizer, reference, sounds):
    pcm = sounds(2.4, 521)
    samples = np.clip(np.round(pcm * 32768), -32768, 32767).astype("<i2")
    env = DeepgramClientEnvironment(base=served.http, production=served.ws, agent=served.ws, agent_rest=served.http)
    messages = []
    async with AsyncDeepgramClient(api_key=KEY, environment=env).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=24000, diarize="true", punctuate="true") as socket:
        data = samples.tobytes()
        for i in range(0, len(data), 3840):
            await socket.send_media(data[i:i + 3840])
        await socket.send_close_stream()
        async for message in socket:
            messages.append(message)
    got = [(w.punctuated_word, round(w.start, 4), round(w.end, 4), w.speaker)
           for m in messages if isinstance(m, ListenV1Results) and m.is_final for w in m.channel.alternatives[0].words]
    want = expected(reference, diarizer, samples.astype(np.float32) / 32768)
    assert want and got == want


def wav(pcm: np.ndarray) -> bytes:
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, 24000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


async def test_uploads_openai_diarized_json_srt_and_deepgram_prerecorded(served, diarizer, reference, sounds):
    import openai

    pcm = sounds(2.4, 511)  # the clip above: its speakers change
    want = expected(reference, diarizer, pcm)
    client = openai.AsyncOpenAI(base_url=served.http + "/v1", api_key=KEY, timeout=300)
    diarized = await client.audio.transcriptions.create(model="gpt-4o-transcribe-diarize", file=("a.wav", wav(pcm)),
                                                        response_format="diarized_json")
    # segments: runs of one speaker's words (cues broken at every change of speaker), labelled A, B, ...
    got = [(s.speaker, s.text) for s in diarized.segments]
    runs: list[tuple[int, list[str]]] = []
    for text, _, _, speaker in want:
        if runs and runs[-1][0] == speaker and len(runs[-1][1]) < 12:
            runs[-1][1].append(text)
        else:
            runs.append((speaker, [text]))
    assert got == [("ABCD"[speaker], " ".join(texts)) for speaker, texts in runs] and len(got) > 1
    srt = await client.audio.transcriptions.create(model="gpt-4o-transcribe-diarize", file=("a.wav", wav(pcm)),
                                                   response_format="srt")
    assert [line for line in srt.splitlines() if line.startswith("[")] == \
        [f"[Speaker {speaker + 1}] " + " ".join(texts) for speaker, texts in runs]

    env = DeepgramClientEnvironment(base=served.http, production=served.ws, agent=served.ws, agent_rest=served.http)
    response = await AsyncDeepgramClient(api_key=KEY, environment=env).listen.v1.media.transcribe_file(
        request=wav(pcm), model="nova-3", diarize=True, punctuate=True)
    words = response.results.channels[0].alternatives[0].words
    assert [(w.punctuated_word, round(w.start, 4), round(w.end, 4), w.speaker) for w in words] == want


def test_make_checkpoint_sortformer_loads_as_the_in_memory_build(diarizer, sounds, tmp_path):
    """``make-checkpoint --family sortformer --size tiny`` (the real CLI) writes a folder that ``--diarizer DIR``
    loads through start-up's real loading path; its activities equal the in-memory ``random:tiny`` build's, bit
    for bit (same weights, same batch-1 shapes), and it still says its weights are random."""
    from typer.testing import CliRunner

    from kyutai_stt.cli import app
    from kyutai_stt.engine.startup import start_diarizer
    from kyutai_stt.settings import Settings

    folder = tmp_path / "sortformer"
    result = CliRunner().invoke(app, ["make-checkpoint", str(folder), "--family", "sortformer", "--size", "tiny"])
    assert result.exit_code == 0, result.output
    assert (folder / "model.nemo").exists()
    saved = start_diarizer(Settings(diarizer=str(folder), device="cpu"))
    try:
        assert saved.info.random_weights
        pcm = sounds(2.4, 511)
        want = diarize(diarizer, [(pcm, 0)])[0]
        got = diarize(saved, [(pcm, 0)])[0]
        assert want.shape[0] > 0 and np.array_equal(got, want)
    finally:
        saved.stop()
