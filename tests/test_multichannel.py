"""Multichannel audio: each channel a slot of one session, its words tagged with the channel and equal to that
channel transcribed alone (the single-stream reference), with a neighbour stream keeping its exact words; through
our client (``/v1/stream``) and Deepgram's real SDK (``multichannel=true``)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import websockets
from deepgram import AsyncDeepgramClient
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results

from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.audio.decoders import stream_decoder
from kyutai_stt.client import Client
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.engine import Engine
from kyutai_stt.messages.events import End, Marker, Word, WordEnd
from kyutai_stt.stream.channels import ChannelSession

from .conftest import start_server
from .helpers import ref_words, words_of

KEY = "channels-key"


@pytest.fixture(scope="module")
def served(checkpoint_dir):
    with start_server(checkpoint_dir, slots=4, api_keys=[KEY]) as running:
        yield running


def int16(pcm: np.ndarray) -> np.ndarray:
    return np.clip(np.round(pcm * 32768), -32768, 32767).astype("<i2")


async def test_a_channel_past_a_marker_waits_for_the_merged_marker(checkpoint_dir):
    """The channels' streams are stepped separately, so one may echo a finalize's marker and go on (words of the
    next segment) while another has not reached it: what follows a channel's echo must come after the merged
    Marker, which a protocol reads as the end of the finalized segment (Deepgram's from_finalize results took a
    later word into the finalized segment when both channels finalized in one engine step)."""
    engine = Engine(load_model(str(checkpoint_dir), "cpu", "float32"), 2)  # not started: the channels' own events
    session = ChannelSession(engine, 2)
    first, second = session.channels
    for channel, event in [(first, Word(text="a", start_time=0.0)), (first, Marker(id=1)),
                           (first, Word(text="next", start_time=1.0)), (first, Marker(id=2)),
                           (first, Word(text="later", start_time=2.0)), (second, Word(text="b", start_time=0.0)),
                           (second, Marker(id=1)), (second, Marker(id=2))]:
        channel._emit(event)
    got = []
    while not session._queue.empty():
        event = session._queue.get_nowait()
        got.append((event.text, event.channel) if isinstance(event, Word) else event.id)
    assert got == [("a", 0), ("b", 1), 1, ("next", 0), 2, ("later", 0)]


def test_channels_decoder_gives_each_channel_as_its_mono_stream():
    rng = np.random.default_rng(5)
    pcm = rng.uniform(-1, 1, (3, 4001)).astype(np.float32)
    interleaved = pcm.T.astype("<f4").tobytes()
    split = stream_decoder("pcm_f32le", 16000, 3, split_channels=True)
    got = np.concatenate([split.feed(interleaved[:1001]), split.feed(interleaved[1001:]), split.end()], axis=1)
    for c in range(3):
        mono = stream_decoder("pcm_f32le", 16000)
        assert np.array_equal(got[c], np.concatenate([mono.feed(pcm[c].tobytes()), mono.end()]))


async def test_client_multichannel_words_equal_each_channel_alone(served, reference, sounds):
    left, right = sounds(1.6, 401), np.concatenate([np.zeros(4000, np.float32), sounds(1.6, 402)[:-4000]])
    neighbour = sounds(2.0, 403)
    client = Client(served.ws, api_key=KEY)

    async def collect(audio):
        return [event async for event in client.stream(audio, chunk_samples=1000)]

    stereo, alone = await asyncio.gather(collect(np.stack([left, right])), collect(neighbour))
    assert isinstance(stereo[-1], End) and stereo[-1].duration == pytest.approx(len(left) / SAMPLE_RATE)
    for channel, pcm in enumerate((left, right)):
        tagged = [e for e in stereo if isinstance(e, (Word, WordEnd)) and e.channel == channel]
        want = ref_words(reference, pcm)
        assert want and words_of(tagged) == want
    assert {e.channel for e in stereo if isinstance(e, (Word, WordEnd))} == {0, 1}
    assert words_of(alone) == ref_words(reference, neighbour)  # the neighbour keeps its exact words
    assert all(getattr(e, "channel", None) is None for e in alone)  # mono events carry no channel


async def test_multichannel_query_is_checked(served):
    base = served.ws + f"/v1/stream?api_key={KEY}"
    for query, reason in (("&format=opus&multichannel=true", "multichannel needs raw PCM"),
                          ("&format=pcm_f32le&channels=3", "needs multichannel=true"),
                          ("&format=pcm_f32le&channels=5&multichannel=true", "5 channels need 5 streams"),
                          ("&diarize=true", "diarize=true needs a server started with a diarizer")):
        async with websockets.connect(base + query) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd.code == 1008 and reason in closed.value.rcvd.reason


async def test_deepgram_diarize_without_a_diarizer_is_refused_at_the_handshake(served):
    from deepgram.core.api_error import ApiError

    with pytest.raises(ApiError) as refused:
        async with deepgram_client(served).listen.v1.connect(model="nova-3", diarize="true"):
            pass
    assert refused.value.status_code == 400  # the SDK keeps no body: the reason is in the server's 400 body


def deepgram_client(server) -> AsyncDeepgramClient:
    env = DeepgramClientEnvironment(base=server.http, production=server.ws, agent=server.ws, agent_rest=server.http)
    return AsyncDeepgramClient(api_key=KEY, environment=env)


async def deepgram_stream(server, data: bytes, channels: int, finalize_at: int | None = None, **options) -> list:
    """``finalize_at``: a Finalize after that many samples of each channel."""
    messages = []
    async with deepgram_client(server).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=24000, channels=channels, punctuate="true",
            **options) as socket:
        cut = len(data) if finalize_at is None else finalize_at * 2 * channels  # int16 bytes
        parts = [data] if finalize_at is None else [data[:cut], data[cut:]]
        for k, part in enumerate(parts):
            for i in range(0, len(part), 3840 * channels):
                await socket.send_media(part[i:i + 3840 * channels])
            if k < len(parts) - 1:
                await socket.send_finalize()
        await socket.send_close_stream()
        async for message in socket:
            messages.append(message)
    return messages


def final_words(messages, channel: int) -> list[tuple[str, float, float]]:
    return [(w.punctuated_word, round(w.start, 4), round(w.end, 4))
            for m in messages if isinstance(m, ListenV1Results) and m.is_final and m.channel_index[0] == channel
            for w in m.channel.alternatives[0].words]


async def test_deepgram_sdk_multichannel_results_per_channel(served, sounds):
    left, right = int16(sounds(1.6, 411)), int16(sounds(1.6, 412))
    stereo = np.stack([left, right], axis=1).reshape(-1).tobytes()
    both, alone_left, alone_right = await asyncio.gather(
        deepgram_stream(served, stereo, 2, multichannel="true", interim_results="true"),
        deepgram_stream(served, left.tobytes(), 1), deepgram_stream(served, right.tobytes(), 1))
    results = [m for m in both if isinstance(m, ListenV1Results)]
    assert {tuple(m.channel_index) for m in results} == {(0, 2), (1, 2)}
    assert final_words(both, 0) == final_words(alone_left, 0) and final_words(both, 0)
    assert final_words(both, 1) == final_words(alone_right, 0) and final_words(both, 1)
    assert isinstance(both[-1], ListenV1Metadata) and both[-1].channels == 2


@pytest.mark.slow  # (3 streams at once; the mono Finalize is checked against the reference in test_agents)
async def test_deepgram_sdk_multichannel_finalize(served, sounds):
    """A Finalize on a multichannel stream closes each channel's word in progress: each channel's finals equal that
    channel sent alone with the same Finalize, with a from_finalize result per channel (it closed the stream with
    1011 before: the channels' session took no finalizing marker)."""
    left, right = int16(sounds(1.5, 413)), int16(sounds(1.5, 414))
    stereo = np.stack([left, right], axis=1).reshape(-1).tobytes()
    cut = 21_000
    both, alone_left, alone_right = await asyncio.gather(
        deepgram_stream(served, stereo, 2, cut, multichannel="true"),
        deepgram_stream(served, left.tobytes(), 1, cut), deepgram_stream(served, right.tobytes(), 1, cut))
    finalized = [tuple(m.channel_index) for m in both if isinstance(m, ListenV1Results) and m.from_finalize]
    assert sorted(finalized) == [(0, 2), (1, 2)]
    assert final_words(both, 0) == final_words(alone_left, 0) and final_words(both, 0)
    assert final_words(both, 1) == final_words(alone_right, 0) and final_words(both, 1)
    assert isinstance(both[-1], ListenV1Metadata) and both[-1].duration == pytest.approx(len(left) / SAMPLE_RATE)
