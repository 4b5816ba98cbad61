"""Voice-agent protocols with their real client packages: Deepgram's /v1/listen (deepgram-sdk, LiveKit's plugin)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import websockets
from deepgram import AsyncDeepgramClient
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results

from kyutai_stt.checkpoint import FRAME_SIZE, SAMPLE_RATE
from kyutai_stt.engine import flush_frame_count

from .conftest import FLUSH_SECONDS, start_server
from .helpers import expected_words

KEY = "agents-key"


@pytest.fixture(scope="module")
def keyed(checkpoint_dir):
    with start_server(checkpoint_dir, slots=4, api_keys=[KEY]) as running:
        yield running


def int16(pcm: np.ndarray) -> tuple[bytes, np.ndarray]:
    """linear16 bytes and the float audio the server decodes from them."""
    samples = np.clip(np.round(pcm * 32768), -32768, 32767).astype("<i2")
    return samples.tobytes(), samples.astype(np.float32) / 32768


def deepgram_client(server) -> AsyncDeepgramClient:
    env = DeepgramClientEnvironment(base=server.http, production=server.ws, agent=server.ws, agent_rest=server.http)
    return AsyncDeepgramClient(api_key=KEY, environment=env)


def words_after_finalize(reference, first: np.ndarray, second: np.ndarray):
    """What a client must get for `first`, Finalize, `second`, CloseStream: the server hears `first`, the engine's
    flush silence, then `second`; times are given without that silence, and the words before Finalize end by then."""
    model = reference.model
    pad = -len(first) % FRAME_SIZE
    silence = pad + (flush_frame_count(model, FLUSH_SECONDS) + 1) * FRAME_SIZE
    heard = np.concatenate([first, np.zeros(silence, np.float32), second])
    at, length = len(first) / SAMPLE_RATE, silence / SAMPLE_RATE

    def shift(t):
        return max(at, t - length) if t > at else t

    before = expected_words(model, reference.outputs(first))
    full = expected_words(model, reference.outputs(heard))
    out = [(w.text, round(shift(w.start), 4), round(max(shift(w.start), min(w.end, at)), 4)) for w in before]
    out += [(w.text, round(shift(w.start), 4), round(shift(w.end), 4)) for w in full[len(before):]]
    return out, len(before)


def results_words(messages):
    return [(w.punctuated_word, round(w.start, 4), round(w.end, 4))
            for m in messages if isinstance(m, ListenV1Results) and m.is_final
            for w in m.channel.alternatives[0].words]


async def test_deepgram_sdk_live_finalize_and_close(keyed, reference, sounds):
    first, second = int16(sounds(1.6, 71)), int16(sounds(1.2, 72))
    want, count_before = words_after_finalize(reference, first[1], second[1])
    messages = []
    async with deepgram_client(keyed).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=24000, channels=1, interim_results="true",
            punctuate="true", language="en-US", vad_events="true", utterance_end_ms=1000) as socket:
        for i in range(0, len(first[0]), 3840):
            await socket.send_media(first[0][i:i + 3840])
        await socket.send_finalize()
        async for message in socket:
            messages.append(message)
            if isinstance(message, ListenV1Results) and message.from_finalize:
                break
        assert results_words(messages) == want[:count_before]
        for i in range(0, len(second[0]), 3840):
            await socket.send_media(second[0][i:i + 3840])
        await socket.send_keep_alive()
        await socket.send_close_stream()
        async for message in socket:
            messages.append(message)
    assert results_words(messages) == want
    assert isinstance(messages[-1], ListenV1Metadata)
    assert messages[-1].duration == pytest.approx((len(first[1]) + len(second[1])) / SAMPLE_RATE, abs=1e-3)
    interims = [m for m in messages if isinstance(m, ListenV1Results) and not m.is_final]
    assert interims and all(m.channel.alternatives[0].transcript for m in interims)


async def test_deepgram_bad_query_and_bad_data(keyed, sounds):
    client = deepgram_client(keyed)
    from deepgram.core.api_error import ApiError

    with pytest.raises(ApiError) as refused:
        async with client.listen.v1.connect(model="nova-3", encoding="flac", sample_rate=16000):
            pass
    assert refused.value.status_code == 400
    async with httpx.AsyncClient() as http:
        response = await http.get(keyed.http + "/v1/listen", params={"encoding": "linear16"})
    with pytest.raises(ApiError) as unauthorized:
        async with AsyncDeepgramClient(api_key="wrong", environment=DeepgramClientEnvironment(
                base=keyed.http, production=keyed.ws, agent=keyed.ws, agent_rest=keyed.http)).listen.v1.connect(
                model="nova-3", encoding="linear16", sample_rate=16000):
            pass
    assert unauthorized.value.status_code == 401
    # bad data: an unknown control gets Deepgram's Error message and close 1008, another stream goes on
    async with websockets.connect(keyed.ws + "/v1/listen?encoding=opus",
                                  additional_headers={"Authorization": f"Token {KEY}"}) as ws:
        await ws.send(b"not an ogg page at all")
        error = await ws.recv()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert '"type":"Error"' in error and "DATA-0000" in error
    assert closed.value.rcvd.code == 1008
