"""Every protocol over real sockets with the real client libraries (websockets, msgpack, openai)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random

import httpx
import msgpack
import numpy as np
import openai
import pytest
import soundfile
import websockets

from kyutai_stt.audio.decode import load_audio_file
from kyutai_stt.audio.constants import FRAME_SIZE
from kyutai_stt.client import Client
from kyutai_stt.messages.events import End, Ready, Step, Text, Word, WordEnd
from kyutai_stt.stream.local import SpeechToText
from kyutai_stt.stream.words import WordAssembler

from .conftest import FLUSH_SECONDS, start_server
from .helpers import expected_events, expected_pieces, expected_words, opus_pages_and_decoded, ref_words, words_of

KEY = "test-key-123"


def wav_bytes(pcm: np.ndarray, rate: int = 24000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def secured(checkpoint_dir, tmp_path_factory):
    """A server with API keys, small bounds and 2 slots, recording what it decodes."""
    record = tmp_path_factory.mktemp("recorded")
    with start_server(checkpoint_dir, slots=2, api_keys=[KEY, "other-key"], idle_timeout_s=2.0,
                      max_message_bytes=256 * 1024, max_session_s=4.0, record_dir=str(record)) as running:
        running.record_dir = record
        yield running


# ----------------------------------------------------------------------------- Kyutai moshi-server protocol
async def kyutai_session(url: str, pcm: np.ndarray, rng: random.Random, headers=None, marker_id: int = 42):
    """Like Kyutai's stt_from_file_rust_server.py: audio, a marker, silence until the marker comes back."""
    received = []
    async with websockets.connect(url + "/api/asr-streaming", additional_headers=headers) as ws:
        async def sender():
            position = 0
            while position < len(pcm):
                size = rng.choice([480, 1920, 3000, 24000])
                chunk = pcm[position:position + size]
                await ws.send(msgpack.packb({"type": "Audio", "pcm": chunk.tolist()}, use_single_float=True))
                position += size
            await ws.send(msgpack.packb({"type": "Marker", "id": marker_id}))
            for _ in range(200):
                await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 1920}, use_single_float=True))
                await asyncio.sleep(0.02)

        task = asyncio.create_task(sender())
        async for message in ws:
            msg = msgpack.unpackb(message)
            received.append(msg)
            if msg["type"] == "Marker":
                break
        task.cancel()
    return received


async def test_kyutai_protocol_matches_reference(server, reference, sounds):
    pcm = sounds(2.1, 21)
    received = await kyutai_session(server.ws, pcm, random.Random(3))
    assert received[0] == {"type": "Ready"}
    assert received[-1] == {"type": "Marker", "id": 42}
    steps = [m for m in received if m["type"] == "Step"]
    # the marker comes back only once all audio before it (plus the model delay) has been transcribed
    model = reference.model
    needed = math.ceil(len(pcm) / FRAME_SIZE) + model.delay_frames
    assert len(steps) >= needed
    # what the server heard: the audio, then the client's silence; outputs are causal, so the reference over the
    # audio plus silence must agree step by step with everything received
    heard = np.concatenate([pcm, np.zeros(len(steps) * FRAME_SIZE, np.float32)])
    outputs = reference.outputs(heard)[: len(steps)]
    assert [s["step_idx"] for s in steps] == list(range(len(steps)))
    np.testing.assert_allclose([s["prs"] for s in steps], [o.pauses for o in outputs], atol=1e-4)
    assembler = WordAssembler(model.tokenizer.id_to_piece, model.delay_frames)
    want = []
    for out in outputs:
        for event in assembler.feed(out.frame, out.token):
            if isinstance(event, Word):
                want.append({"type": "Word", "text": event.text, "start_time": pytest.approx(event.start_time)})
            elif isinstance(event, WordEnd):
                want.append({"type": "EndWord", "stop_time": pytest.approx(event.stop_time)})
    assert [m for m in received if m["type"] in ("Word", "EndWord")] == want


async def test_kyutai_opus_and_bad_messages(server, reference, sounds):
    pages, decoded = opus_pages_and_decoded(sounds(1.0, 22))
    async with websockets.connect(server.ws + "/api/asr-streaming") as ws:
        assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
        await ws.send("text frames are ignored")
        await ws.send(msgpack.packb({"type": "Init"}))
        assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
        for page in pages:
            await ws.send(msgpack.packb({"type": "OggOpus", "data": page}))
        await ws.send(msgpack.packb({"type": "Audio", "pcm": [float("nan")] * 10}, use_single_float=True))
        messages = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                messages.append(msgpack.unpackb(await ws.recv()))
        assert closed.value.rcvd.code == 1007
        assert messages[-1]["type"] == "Error" and "NaN" in messages[-1]["message"]


async def test_kyutai_post_returns_words(server, reference, sounds):
    pcm = sounds(1.7, 23)
    async with httpx.AsyncClient(timeout=300) as client:
        response = await client.post(server.http + "/api/asr-streaming", content=wav_bytes(pcm))
    assert response.status_code == 200
    want = []
    for event in expected_events(reference.model, reference.outputs(pcm)):
        if isinstance(event, Word):
            want.append({"type": "Word", "text": event.text, "start_time": pytest.approx(event.start_time)})
        elif isinstance(event, WordEnd):
            want.append({"type": "EndWord", "stop_time": pytest.approx(event.stop_time)})
    assert response.json() == want


# ----------------------------------------------------------------------------- OpenAI
def test_openai_sdk_all_formats(server, reference, sounds, tmp_path):
    pcm = sounds(2.4, 31)
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(pcm))
    client = openai.OpenAI(base_url=server.http + "/v1", api_key="unused", timeout=300)
    want = expected_words(reference.model, reference.outputs(pcm))
    text = " ".join(w.text for w in want)

    assert [m.id for m in client.models.list()] == [reference_model_name(server)]
    with path.open("rb") as f:
        assert client.audio.transcriptions.create(model="kyutai", file=f).text == text
    with path.open("rb") as f:
        assert client.audio.transcriptions.create(model="kyutai", file=f, response_format="text").strip() == text
    with path.open("rb") as f:
        verbose = client.audio.transcriptions.create(model="kyutai", file=f, response_format="verbose_json",
                                                     timestamp_granularities=["word"])
    assert verbose.text == text and verbose.duration == pytest.approx(len(pcm) / 24000, abs=1e-3)
    assert [(w.word, w.start, w.end) for w in verbose.words] == [(w.text, pytest.approx(w.start), pytest.approx(w.end)) for w in want]
    assert " ".join(s.text.strip() for s in verbose.segments) == text
    with path.open("rb") as f:
        srt = client.audio.transcriptions.create(model="kyutai", file=f, response_format="srt")
    with path.open("rb") as f:
        vtt = client.audio.transcriptions.create(model="kyutai", file=f, response_format="vtt")
    from kyutai_stt.stream.formats import to_srt, to_vtt
    duration = len(pcm) / 24000  # cues never run past the audio
    assert srt.strip() == to_srt(want, duration).strip() and vtt.strip() == to_vtt(want, duration).strip()
    with path.open("rb") as f:
        stream = client.audio.transcriptions.create(model="kyutai", file=f, stream=True)
        events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    done = [e for e in events if e.type == "transcript.text.done"]
    pieces = "".join(expected_pieces(reference.model, reference.outputs(pcm))).lstrip()
    assert deltas == pieces and done[0].text == pieces


def reference_model_name(server) -> str:
    from pathlib import Path
    return Path(server.app.state.service.settings.model).name


async def test_openai_concurrent_files_share_the_batch(server, reference, sounds):
    clips = [sounds(s, 40 + i) for i, s in enumerate([0.8, 1.5, 1.1, 2.0])]
    client = openai.AsyncOpenAI(base_url=server.http + "/v1", api_key="unused", timeout=300)
    results = await asyncio.gather(*(
        client.audio.transcriptions.create(model="kyutai", file=("a.wav", wav_bytes(c)), response_format="verbose_json",
                                           timestamp_granularities=["word"]) for c in clips))
    for result, clip in zip(results, clips):
        assert [(w.word, round(w.start, 4), round(w.end, 4)) for w in result.words] == ref_words(reference, clip)


def test_openai_rejects_bad_input(server):
    client = openai.OpenAI(base_url=server.http + "/v1", api_key="unused", timeout=60)
    with pytest.raises(openai.BadRequestError) as bad:
        client.audio.transcriptions.create(model="kyutai", file=("x.wav", b"not audio at all"))
    assert "could not decode" in str(bad.value)
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="kyutai", file=("x.wav", wav_bytes(np.zeros(2400, np.float32))),
                                           response_format="xml")


# ----------------------------------------------------------------------------- JSON events, identical across protocols
async def test_events_protocol_resamples_pcm(secured, reference, sounds):
    pcm16k = (sounds(1.5, 51)[::3] * 32767).astype("<i2")  # 8 kHz-ish content declared as 16 kHz int16
    url = secured.ws + "/v1/stream?format=pcm_s16le&sample_rate=16000&api_key=" + KEY
    events = []
    async with websockets.connect(url) as ws:
        data = pcm16k.tobytes()
        for offset in range(0, len(data), 777):  # odd sizes: samples split across messages
            await ws.send(data[offset:offset + 777])
        await ws.send(json.dumps({"type": "marker", "id": 5}))
        await ws.send(json.dumps({"type": "end"}))
        async for message in ws:
            events.append(json.loads(message))
    assert events[0] == {"type": "ready"} and events[-1]["type"] == "end"
    assert {"type": "marker", "id": 5} in events
    recorded = sorted(secured.record_dir.glob("*.wav"), key=lambda p: p.stat().st_mtime)[-1]
    heard = load_audio_file(recorded)
    assert abs(len(heard) - len(pcm16k) * 1.5) <= 1
    got = [(e["text"], e["start_time"]) for e in events if e["type"] == "word"]
    want = [(e.text, e.start_time) for e in expected_events(reference.model, reference.outputs(heard)) if isinstance(e, Word)]
    assert got == want


async def test_same_words_through_every_protocol(server, reference, speech, bria):
    """Generated speech and bria.mp3: events WS, OpenAI, Kyutai POST and in-process give identical words."""
    bria = bria[: 24000 * 20]  # 20 s keeps the default test run short; scripts/ run the whole file
    for pcm in (speech, bria):
        want = ref_words(reference, pcm)
        openai_client = openai.AsyncOpenAI(base_url=server.http + "/v1", api_key="unused", timeout=600)

        async def via_events():
            return words_of([e async for e in Client(server.ws).stream(pcm, chunk_samples=5000)])

        async def via_openai():
            result = await openai_client.audio.transcriptions.create(
                model="kyutai", file=("a.wav", wav_bytes(pcm)), response_format="verbose_json",
                timestamp_granularities=["word"])
            return [(w.word, round(w.start, 4), round(w.end, 4)) for w in result.words]

        async def via_post():
            async with httpx.AsyncClient(timeout=600) as client:
                messages = (await client.post(server.http + "/api/asr-streaming", content=wav_bytes(pcm))).json()
            events = [Word(text=m["text"], start_time=m["start_time"]) if m["type"] == "Word" else WordEnd(stop_time=m["stop_time"])
                      for m in messages]
            return words_of(events)

        results = await asyncio.gather(via_events(), via_openai(), via_post())
        assert results[0] == results[1] == results[2] == want
        starts = [w[1] for w in want]
        assert starts == sorted(starts) and all(0 <= s <= len(pcm) / 24000 + 1.0 for s in starts)


async def test_client_library_over_each_protocol(server, reference, sounds):
    pcm = sounds(1.6, 61)
    events = [e async for e in Client(server.ws, "events").stream(pcm, steps=True)]
    assert isinstance(events[0], Ready) and isinstance(events[-1], End)
    assert words_of(events) == ref_words(reference, pcm)
    assert len([e for e in events if isinstance(e, Step)]) == len(reference.outputs(pcm))

    kyutai_events = [e async for e in Client(server.ws, "kyutai").stream(pcm)]
    assert isinstance(kyutai_events[-1], End)
    got = [(e.text, e.start_time) for e in kyutai_events if isinstance(e, Word)]
    full = [(e.text, e.start_time) for e in expected_events(reference.model, reference.outputs(pcm)) if isinstance(e, Word)]
    # moshi-server's protocol has no flush: the words before the marker are a prefix of the flushed ones
    assert got and full[: len(got)] == got

    _, decoded = opus_pages_and_decoded(pcm)
    seed_events = [e async for e in Client(server.ws, "seed").stream(pcm)]
    assert [e.text for e in seed_events if isinstance(e, Text)] == expected_pieces(reference.model, reference.outputs(decoded))


def test_in_process_transcribe_stream(checkpoint_dir, reference, sounds):
    pcm = sounds(1.9, 71)
    with SpeechToText.load(str(checkpoint_dir), device="cpu", dtype="float32", slots=2,
                           flush_seconds=FLUSH_SECONDS) as stt:  # as the reference's
        with stt.transcribe_stream() as stream:
            for offset in range(0, len(pcm), 1000):
                stream.add_audio(pcm[offset:offset + 1000])
        assert [(w.text, round(w.start, 4), round(w.end, 4)) for w in stream.words] == ref_words(reference, pcm)
        assert stream.text == " ".join(w[0] for w in ref_words(reference, pcm))


# ----------------------------------------------------------------------------- auth and session bounds
async def test_auth_on_every_endpoint(secured, sounds):
    for path in ("/api/asr-streaming", "/v1/stream", "/ws", "/v1/realtime", "/v1/listen", "/v2/listen"):
        with pytest.raises(websockets.InvalidStatus) as denied:
            async with websockets.connect(secured.ws + path):
                pass
        assert denied.value.response.status_code == 401, path
        if path.startswith(("/v1/listen", "/v2/listen")):  # Deepgram's REST error body
            assert json.loads(denied.value.response.body)["err_code"] == "INVALID_AUTH"
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(secured.ws + "/api/asr-streaming", additional_headers={"kyutai-api-key": "wrong"}):
            pass
    async with websockets.connect(secured.ws + "/api/asr-streaming", additional_headers={"kyutai-api-key": KEY}) as ws:
        assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
    async with websockets.connect(secured.ws + "/api/asr-streaming?auth_id=other-key") as ws:
        assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
    async with httpx.AsyncClient(timeout=60) as client:
        assert (await client.get(secured.http + "/v1/models")).status_code == 401
        assert (await client.get(secured.http + "/v1/models", headers={"Authorization": "Bearer " + KEY})).status_code == 200
        assert (await client.post(secured.http + "/api/asr-streaming", content=b"x")).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.http + "/v1", api_key="wrong").models.list()


async def test_session_bounds(secured, sounds):
    # idle: nothing sent for idle_timeout_s -> 1008
    async with websockets.connect(secured.ws + "/v1/stream?api_key=" + KEY) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await ws.recv()
    assert closed.value.rcvd.code == 1008 and "no data" in closed.value.rcvd.reason
    # a message over max_message_bytes -> 1009
    async with websockets.connect(secured.ws + "/v1/stream?format=pcm_f32le&api_key=" + KEY) as ws:
        await ws.recv()
        await ws.send(np.zeros(100_000, "<f4").tobytes())
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await ws.recv()
    assert closed.value.rcvd.code == 1009
    # longer than max_session_s -> 1008 with the limit in the reason
    async with websockets.connect(secured.ws + "/v1/stream?format=pcm_f32le&api_key=" + KEY) as ws:
        await ws.recv()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            for _ in range(10):
                await ws.send(np.zeros(24000, "<f4").tobytes())
            while True:
                await ws.recv()
    assert closed.value.rcvd.code == 1008 and "limit" in closed.value.rcvd.reason


async def test_kyutai_full_slots(secured):
    headers = {"kyutai-api-key": KEY}
    async with websockets.connect(secured.ws + "/api/asr-streaming", additional_headers=headers) as a, \
            websockets.connect(secured.ws + "/api/asr-streaming", additional_headers=headers) as b:
        await a.recv(), await b.recv()
        async with websockets.connect(secured.ws + "/api/asr-streaming", additional_headers=headers) as c:
            assert msgpack.unpackb(await c.recv()) == {"type": "Error", "message": "no free channels"}
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await c.recv()
        assert closed.value.rcvd.code == 1013
