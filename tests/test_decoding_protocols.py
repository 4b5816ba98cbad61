"""Decoding controls through the protocols with their real clients (issue 20): /v1/stream (our client and the
websockets package: temperature, seed, keyterms, the reset control), Deepgram's keyterm (deepgram-sdk), OpenAI's
prompt and temperature (openai). Every stream's words equal the reference run with the same options; greedy
neighbours keep theirs."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets

from kyutai_stt.client import Client
from kyutai_stt.engine.contract import DecodingOptions
from kyutai_stt.messages.events import Ready, Reset

from .helpers import expected_words, words_of

SAMPLING = DecodingOptions(temperature=0.5, seed=7)


def keyterm_for(model, tokens: list[int]) -> tuple[str, int]:
    """A one-piece word the greedy run never emits."""
    for token in range(4, model.lm.text_card):
        piece = model.tokenizer.id_to_piece(token)
        if piece.startswith("▁") and len(piece) > 3 and token not in tokens:
            if list(model.tokenizer.encode(piece[1:])) == [token]:
                return piece[1:], token
    raise AssertionError("no candidate keyterm")


def ref(reference, pcm, **decoding):
    return [(w.text, round(w.start, 4), round(w.end, 4))
            for w in expected_words(reference.model, reference.outputs(pcm, **decoding))]


async def collect(stream) -> list:
    return [event async for event in stream]


async def test_stream_sampling_keyterms_and_greedy_neighbour(server, reference, bria):
    clip, other = bria[24000 * 3: 24000 * 6].copy(), bria[24000 * 15: 24000 * 18].copy()
    term, token = keyterm_for(reference.model, reference.tokens(other))
    boosted = DecodingOptions(keyterms=(term,))
    client = Client(server.http)
    sampled, seeded_randomly, keyed, greedy = await asyncio.gather(
        collect(client.stream(clip, temperature=0.5, seed=7)),
        collect(client.stream(clip, temperature=0.5)),
        collect(client.stream(other, keyterms=(term,))),
        collect(client.stream(clip)))
    assert sampled[0] == Ready(seed=7)
    assert isinstance(seeded_randomly[0].seed, int)
    assert greedy[0] == Ready() and "seed" not in greedy[0].model_dump_json()
    assert words_of(sampled) == ref(reference, clip, options=SAMPLING) != ref(reference, clip)
    assert words_of(keyed) == ref(reference, other, options=boosted)
    assert term in [w[0] for w in words_of(keyed)] and term not in [w[0] for w in ref(reference, other)]
    assert words_of(greedy) == ref(reference, clip)
    # the random seed reproduces its run
    again = await collect(client.stream(clip, temperature=0.5, seed=seeded_randomly[0].seed))
    assert words_of(again) == words_of(seeded_randomly)


@pytest.mark.parametrize("query, words", [("temperature=2.5", "temperature"), ("temperature=-1", "temperature"),
                                          ("seed=-3", "seed"), ("temperature=hot", "temperature")])
async def test_stream_decoding_query_out_of_range_is_refused(server, query, words):
    async with websockets.connect(f"{server.ws}/v1/stream?format=pcm_f32le&{query}") as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1008 and words in ws.close_reason


async def test_stream_reset_control(server, reference, bria):
    clip = bria[24000 * 3: 24000 * 7].copy()
    async with websockets.connect(f"{server.ws}/v1/stream?format=pcm_f32le&sample_rate=24000") as ws:
        half = 24000 * 2
        await ws.send(clip[:half].astype("<f4").tobytes())
        await asyncio.sleep(1.0)
        await ws.send(json.dumps({"type": "reset"}))
        await ws.send(clip[half:].astype("<f4").tobytes())
        await ws.send(json.dumps({"type": "end"}))
        events = []
        async for message in ws:
            events.append(json.loads(message))
    from kyutai_stt.messages.events import parse_event

    parsed = [parse_event(json.dumps(e)) for e in events]
    resets = [e for e in parsed if isinstance(e, Reset)]
    assert len(resets) == 1 and resets[0].reason == "client"
    frame = round(resets[0].time * 12.5) + reference.model.prefix_frames
    assert words_of(parsed) == ref(reference, clip, resets=(frame,))


async def test_deepgram_keyterm_and_openai_prompt_and_temperature(server, reference, bria, tmp_path):
    import io

    import openai
    import soundfile
    from deepgram import AsyncDeepgramClient
    from deepgram.environment import DeepgramClientEnvironment
    from deepgram.listen.v1.types import ListenV1Results

    samples = np.clip(np.round(bria[24000 * 15: 24000 * 18] * 32768), -32768, 32767).astype("<i2")
    pcm = samples.astype(np.float32) / 32768  # what the server decodes
    term, _ = keyterm_for(reference.model, reference.tokens(pcm))
    want = ref(reference, pcm, options=DecodingOptions(keyterms=(term,)))
    assert term in [w[0] for w in want]

    env = DeepgramClientEnvironment(base=server.http, production=server.ws, agent=server.ws, agent_rest=server.http)
    messages = []
    async with AsyncDeepgramClient(api_key="x", environment=env).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=24000, keyterm=term) as socket:
        data = samples.tobytes()
        for i in range(0, len(data), 7680):
            await socket.send_media(data[i:i + 7680])
        await socket.send_close_stream()
        async for message in socket:
            messages.append(message)
    got = [(w.punctuated_word, round(w.start, 4), round(w.end, 4)) for m in messages
           if isinstance(m, ListenV1Results) and m.is_final for w in m.channel.alternatives[0].words]
    assert got == want

    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, 24000, format="WAV", subtype="FLOAT")
    path = tmp_path / "clip.wav"
    path.write_bytes(buffer.getvalue())
    client = openai.AsyncOpenAI(base_url=server.http + "/v1", api_key="x", timeout=300)
    keyed = await client.audio.transcriptions.create(model="m", file=path.open("rb"), prompt=f"{term}, another")
    want_two = ref(reference, pcm, options=DecodingOptions(keyterms=(term, "another")))
    assert keyed.text == " ".join(w[0] for w in want_two)
    sampled = await client.audio.transcriptions.create(model="m", file=path.open("rb"), temperature=0.7)
    assert isinstance(sampled.text, str)  # accepted (a random seed: the words are not reproducible here)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.audio.transcriptions.create(model="m", file=path.open("rb"), temperature=3)
    assert refused.value.body["param"] == "temperature"


# ------------------------------------------------------------------------------ OpenAI Realtime
async def realtime_transcript(server, data: bytes, updates: dict[int, dict]) -> tuple[str, list]:
    """One Realtime transcription session (the ``openai`` client), committed by hand (``updates`` must have offset
    0); ``updates``: byte offset in ``data`` -> a ``session.update`` there with ``turn_detection`` null and these
    ``transcription`` fields. The committed item's transcript, and the error events."""
    import base64

    import openai

    client = openai.AsyncOpenAI(base_url=server.http + "/v1", api_key="x")
    errors = []
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as rt:
        assert (await rt.recv()).type == "session.created"
        cuts = sorted({0, len(data), *updates})
        for start, stop in zip(cuts, cuts[1:]):
            if start in updates:
                await rt.session.update(session={"type": "transcription", "audio": {"input": {
                    "turn_detection": None, "transcription": updates[start]}}})
            for i in range(start, stop, 4800):
                await rt.input_audio_buffer.append(audio=base64.b64encode(data[i:min(i + 4800, stop)]).decode())
        await rt.input_audio_buffer.commit()
        async for event in rt:
            if event.type == "error":
                errors.append(event.error)
            elif event.type == "conversation.item.input_audio_transcription.completed":
                return event.transcript, errors
    raise AssertionError("no transcript")


async def test_realtime_prompt_is_keyterms_from_where_it_came(server, reference, bria):
    """Keyterms by session.update (``transcription.keywords``, ``prompt`` as a list): before the audio, the words
    are the reference's with those keyterms; mid-stream, the reference's with the keyterms from the next frame on;
    a greedy neighbour keeps its words; too long a term is an ``error`` event and the session goes on."""
    from kyutai_stt.audio.constants import FRAME_SIZE

    samples = np.clip(np.round(bria[24000 * 15: 24000 * 18] * 32768), -32768, 32767).astype("<i2")
    pcm = samples.astype(np.float32) / 32768  # what the server decodes
    data = samples.tobytes()
    term, _ = keyterm_for(reference.model, reference.tokens(pcm))
    keyed = DecodingOptions(keyterms=(term, "another"))
    half = FRAME_SIZE * 15 + 700  # samples before the mid-stream update: it applies from the next frame on
    frame = reference.model.prefix_frames - (-half // FRAME_SIZE)

    def text(**decoding) -> str:
        return " ".join(w[0] for w in ref(reference, pcm, **decoding))

    early, late, plain, refused = await asyncio.gather(
        realtime_transcript(server, data, {0: {"keywords": [term], "prompt": "another"}}),
        realtime_transcript(server, data, {0: {}, 2 * half: {"prompt": f"{term}\nanother"}}),
        realtime_transcript(server, data, {0: {"model": "kyutai"}}),
        realtime_transcript(server, data, {0: {}, 2 * half: {"prompt": "x" * 65}}))
    assert early == (text(options=keyed), []) and term in early[0].split()
    assert plain == (text(), []) and term not in plain[0].split()
    assert refused[0] == text() and [e.param for e in refused[1]] == ["session.audio.input.transcription.prompt"]
    assert "keyterm" in refused[1][0].message
    assert late == (text(changes=((frame, keyed),)), [])
    assert late[0] not in (text(), early[0])  # the change counts, and so does where it came
