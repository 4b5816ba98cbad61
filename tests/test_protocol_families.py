"""The protocol tests' core, run against both model families (issue 22): a Kyutai delayed-streams checkpoint and an
NVIDIA cache-aware one (NeMo), each tiny with random weights. Every protocol gives the family's own single-stream
reference words, exactly: /v1/stream (our client, two streams at once), moshi-server's msgpack, Deepgram live with
Finalize (deepgram-sdk), OpenAI file uploads and Realtime with manual commits (openai). Flux and the Realtime API's
server-side turn detection read the model's VAD head: a NeMo model has none, so they are refused with a message
that says so.

Each test takes a ``family`` (indirect parametrization, one server per family for the module): its server and
``words(pcm)``, the reference's (text, start, end) words. The default run has NeMo's variants (about a second
each); Kyutai's, already covered by test_protocols and test_agents, and the multi-process one are slow (CI runs
them).
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest
from deepgram.listen.v1.types import ListenV1Results

from kyutai_stt.client import Client
from kyutai_stt.messages.events import Word, WordEnd
from kyutai_stt.settings import Settings
from kyutai_stt.stream.words import WordAssembler, pair_words

from .conftest import RunningServer, free_port
from .helpers import ref_words, words_of
from .test_agents import KEY as AGENTS_KEY, deepgram_client, int16, words_after_finalize
from .test_protocols import wav_bytes

RATE = 24000
FRAME = 1920  # 80 ms at 24 kHz: both families' frame


class Family:
    """A served family: its server and its reference words."""

    def __init__(self, name: str, folder, server, words, finalized):
        self.name, self.folder, self.server, self.words, self.finalized = name, folder, server, words, finalized


def _kyutai(request) -> Family:
    server, reference = request.getfixturevalue("server"), request.getfixturevalue("reference")

    def finalized(first, second):
        return [w[0] for w in words_after_finalize(reference, first, second)[0]]

    return Family("kyutai", request.getfixturevalue("checkpoint_dir"), server, lambda pcm: ref_words(reference, pcm), finalized)


def _nemo_words(model, info, heard: np.ndarray) -> list[tuple[str, float, float]]:
    """NeMo's batch-1 streaming labels read as words the way the server reads a stream's tokens."""
    from .test_nemo import expected_tokens

    assembler = WordAssembler.for_model(info)
    assembler.audio_end = len(heard) / RATE
    events = []
    for frame, token in enumerate(expected_tokens(model, heard)):
        events += assembler.feed(frame, token)
    events += assembler.finish(-(-len(heard) // FRAME))
    return [(w.text, round(w.start, 4), round(w.end, 4))
            for w in pair_words(e for e in events if isinstance(e, (Word, WordEnd)))]


def _nemo(request, stack) -> Family:
    pytest.importorskip("nemo.collections.asr")
    from kyutai_stt.engine.nemo.checkpoint import load_model
    from kyutai_stt.engine.startup import load
    from kyutai_stt.serve.server import create_app

    from .test_nemo import checkpoint  # cached in $KYUTAI_STT_TEST_NEMO_CHECKPOINT, as test_nemo's

    folder = checkpoint(request.getfixturevalue("tmp_path_factory"), "ctc")
    settings = Settings(model=str(folder), device="cpu", dtype="float32", slots=4)
    server = stack.enter_context(RunningServer(create_app(settings, load(settings)), free_port()))
    model, info = load_model(str(folder), "cpu", "float32"), server.engine.info

    def finalized(first, second):
        """As ``test_agents.words_after_finalize``: the server hears ``first``, the flush's silence (the last frame
        completed, the engine step filled, then the chunk's look-ahead: ``stream.flush``), then ``second``. The
        words up to the end of the flush are closed at the Finalize; a fresh word assembler goes on from there."""
        from .test_nemo import expected_tokens

        pad = -len(first) % FRAME
        fill = -((len(first) + pad) // FRAME) % info.frames_per_step
        silence = pad + (info.flush_frames + fill + info.lookahead_frames) * FRAME
        heard = np.concatenate([first, np.zeros(silence, np.float32), second])
        end = (len(first) + silence) // FRAME
        tokens = expected_tokens(model, heard)

        def words(start: int, stop: int, audio_end: float) -> list[str]:
            assembler = WordAssembler.for_model(info)
            assembler.audio_end = audio_end
            events = [e for frame, token in enumerate(tokens[start:stop], start) for e in assembler.feed(frame, token)]
            events += assembler.finish(stop)
            return [w.text for w in pair_words(e for e in events if isinstance(e, (Word, WordEnd)))]

        return words(0, end, len(first) / RATE) + words(end, len(tokens), len(heard) / RATE)

    return Family("nemo", folder, server, lambda pcm: _nemo_words(model, info, pcm), finalized)


@pytest.fixture(scope="module")
def family(request):
    import contextlib

    with contextlib.ExitStack() as stack:
        yield _kyutai(request) if request.param == "kyutai" else _nemo(request, stack)


# Kyutai's variants are slow: test_protocols and test_agents cover that family in the default run (and took 2 min
# here on a loaded 2-core machine); NeMo's take about a second each
BOTH = pytest.mark.parametrize("family", [pytest.param("kyutai", marks=pytest.mark.slow), "nemo"], indirect=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (as test_nemo): the tiny models gain nothing from two on a loaded 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips(bria):
    """Real speech: random weights turn it into changing labels on both families (a synthetic tone may not)."""
    return bria[: RATE * 3 + 777], bria[RATE * 8: RATE * 10 + 100]


@BOTH
async def test_v1_stream_two_at_once(family, clips):
    """/v1/stream through our client: two streams at once, fed in different piece sizes, each gets its own
    reference words, times included."""
    pcm, other = clips
    want, want_other = family.words(pcm), family.words(other)
    assert want and want_other  # random weights still give words: the check bites

    async def stream(audio, chunk):
        return words_of([e async for e in Client(family.server.ws).stream(audio, chunk_samples=chunk)])

    assert await asyncio.gather(stream(pcm, 5000), stream(other, 1234)) == [want, want_other]


@BOTH
async def test_kyutai_msgpack_words(family, clips):
    """moshi-server's protocol (our client): it has no flush, so the words before its end marker are a prefix of
    the reference's."""
    pcm = clips[0]
    events = [e async for e in Client(family.server.ws, "kyutai").stream(pcm)]
    got = [(e.text, round(e.start_time, 4)) for e in events if isinstance(e, Word)]
    assert got and got == [(w[0], w[1]) for w in family.words(pcm)][:len(got)]


@BOTH
def test_openai_file_words(family, clips):
    """An OpenAI upload (verbose_json with word times) gives the reference's words."""
    pcm = clips[1]
    client = openai.OpenAI(base_url=family.server.http + "/v1", api_key="unused", timeout=600)
    result = client.audio.transcriptions.create(model=family.name, file=("a.wav", wav_bytes(pcm)),
                                                response_format="verbose_json", timestamp_granularities=["word"])
    assert [(w.word, round(w.start, 4), round(w.end, 4)) for w in result.words] == family.words(pcm)


@BOTH
async def test_deepgram_live_finalize(family, clips):
    """deepgram-sdk over /v1/listen: audio, Finalize (answered with from_finalize), more audio, CloseStream: the
    final words are the reference's for what the engine heard (the flush's silence inside)."""
    (first, heard_first), (second, heard_second) = int16(clips[0][: RATE * 2 + 333]), int16(clips[1])
    want = family.finalized(heard_first, heard_second)
    assert len(want) > 2
    messages = []
    async with deepgram_client(family.server).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=RATE, channels=1, interim_results="true",
            punctuate="true") as socket:
        for i in range(0, len(first), 3840):
            await socket.send_media(first[i:i + 3840])
        await socket.send_finalize()
        async for message in socket:
            messages.append(message)
            if isinstance(message, ListenV1Results) and message.from_finalize:
                break
        for i in range(0, len(second), 3840):
            await socket.send_media(second[i:i + 3840])
        await socket.send_close_stream()
        async for message in socket:
            messages.append(message)
    got = [w.punctuated_word for m in messages if isinstance(m, ListenV1Results) and m.is_final
           for w in m.channel.alternatives[0].words]  # punctuate=true: the model's own spelling
    assert got == want


@BOTH
async def test_openai_realtime_manual_commit(family, clips):
    """The Realtime API with turn_detection null: the audio, one commit; the items' transcripts are the
    reference's words."""
    data, heard = int16(clips[0])
    want = " ".join(w[0] for w in family.words(heard))
    assert want
    client = openai.AsyncOpenAI(base_url=family.server.http + "/v1", api_key=AGENTS_KEY)
    completed = []
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        assert (await connection.recv()).type == "session.created"
        await connection.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None}}})
        assert (await connection.recv()).type == "session.updated"
        for i in range(0, len(data), 4800):
            await connection.input_audio_buffer.append(audio=base64.b64encode(data[i:i + 4800]).decode())
        await connection.input_audio_buffer.commit()
        async for event in connection:
            if event.type == "conversation.item.input_audio_transcription.completed":
                completed.append(event.transcript)
                if sum(len(t.split()) for t in completed) >= len(want.split()):
                    break
    assert " ".join(completed) == want


@pytest.mark.parametrize("family", ["nemo"], indirect=True)
async def test_turns_refused_without_a_vad_head(family):
    """A NeMo model has no VAD head: Flux (/v2/listen) is refused at the handshake (HTTP 400, saying why and what
    to use), and so is the Realtime API's server_vad; a Realtime session defaults to manual commits."""
    import websockets

    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(family.server.ws + "/v2/listen?encoding=linear16&sample_rate=16000"):
            pass
    assert refused.value.response.status_code == 400
    assert "no VAD head" in refused.value.response.body.decode() and "/v1/listen" in refused.value.response.body.decode()
    client = openai.AsyncOpenAI(base_url=family.server.http + "/v1", api_key="unused")
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        created = await connection.recv()
        assert created.type == "session.created" and created.session.audio.input.turn_detection is None
        await connection.session.update(session={"type": "transcription", "audio": {"input": {
            "turn_detection": {"type": "server_vad"}}}})
        error = await connection.recv()
        assert error.type == "error" and "VAD head" in error.error.message
        assert error.error.param == "session.audio.input.turn_detection"
    async with httpx.AsyncClient() as http:  # the server goes on
        assert (await http.get(family.server.http + "/status")).status_code == 200


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("family", ["nemo"], indirect=True)
async def test_nemo_through_two_workers(family, clips, tmp_path):
    """`serve --workers 2` with a NeMo model (its own engine process, the IPC carrying RNNT's more_tokens too):
    a stream on each worker, at once, each gets the reference's words."""
    from .test_workers import Launcher, spread_streams

    launcher = Launcher(family.folder, tmp_path / "workers.log")
    try:
        launcher.wait_ready()
        streams = await spread_streams(launcher, 2, "?format=pcm_f32le")  # one on each worker

        async def feed(stream, pcm):
            await stream.send([pcm[i:i + 4800].astype("<f4").tobytes() for i in range(0, len(pcm), 4800)])
            return await stream.finish()

        assert await asyncio.gather(*(feed(s, pcm) for s, pcm in zip(streams, clips))) == [1000, 1000]
        for stream, pcm in zip(streams, clips):
            assert [(w.text, round(w.start, 4), round(w.end, 4)) for w in stream.words()] == family.words(pcm)
    finally:
        launcher.stop()
