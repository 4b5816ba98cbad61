"""Property-based fuzzing of every protocol adapter over real sockets (hypothesis).

Arbitrary bytes and arbitrary message sequences (binary and text frames, msgpack maps with random fields, JSON
controls, real Ogg pages cut and damaged) go to each WebSocket endpoint, arbitrary bytes to the HTTP endpoints.
Whatever comes in, the server must answer with an allowed close code or HTTP status (1011 and 500 are kept for
engine failures, and the engine never fails here), never hang, and be healthy with every slot free afterwards.

The examples are derandomized (the same every run, so CI is stable); set ``KYUTAI_STT_FUZZ_RANDOM=1`` to explore
new ones and ``KYUTAI_STT_FUZZ_EXAMPLES=N`` to run more.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from urllib.parse import quote

import httpx
import msgpack
import pytest
import websockets
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kyutai_stt.audio.decode import encode_ogg_opus
from kyutai_stt.client import Client
from kyutai_stt.engine.kyutai.testing_checkpoint import synthetic_sounds

from .hardening import ref_words, words_of

EXAMPLES = int(os.environ.get("KYUTAI_STT_FUZZ_EXAMPLES", "30"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("KYUTAI_STT_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

WS_CODES = {1000, 1003, 1007, 1008, 1009}  # normal end, text for binary, bad payload, policy (bounds), too big
POST_STATUS = {200, 400, 413}
OPENAI_STATUS = {200, 400, 413, 422}
EXAMPLE_TIMEOUT = 60.0

PAGES = encode_ogg_opus(synthetic_sounds(0.5, 7))  # real Ogg/Opus pages: headers, then audio


@pytest.fixture(scope="module")
def loop():
    """The examples run on their own event loop (hypothesis calls a plain function once per example)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run(loop, coroutine):
    return loop.run_until_complete(asyncio.wait_for(coroutine, EXAMPLE_TIMEOUT))


# ------------------------------------------------------------------------------------------------ strategies
@st.composite
def ogg_bytes(draw) -> bytes:
    """A prefix of a real Ogg/Opus stream, maybe with some bytes changed, cut anywhere."""
    data = bytearray(b"".join(PAGES[: draw(st.integers(1, len(PAGES)))]))
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut])


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    out, position = [], 0
    for size in sizes:
        out.append(data[position:position + size])
        position += size
    if position < len(data):
        out.append(data[position:])
    return out


binary = st.binary(max_size=3000)
text = st.text(max_size=200)
any_value = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(width=32) | st.text(max_size=20)
    | st.binary(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)


@st.composite
def json_control(draw) -> str:
    control = {"type": draw(st.sampled_from(["end", "marker", "Marker", ""]) | st.text(max_size=10))}
    if draw(st.booleans()):
        control["id"] = draw(json_value)
    control.update(draw(st.dictionaries(st.text(max_size=8), json_value, max_size=3)))
    return json.dumps(control)


@st.composite
def kyutai_message(draw) -> bytes | str:
    kind = draw(st.sampled_from(["valid", "valid", "map", "map", "raw", "text"]))
    if kind == "valid":  # well-formed messages, so that sequences get past their first message
        message = draw(st.sampled_from([
            {"type": "Audio", "pcm": draw(st.lists(st.floats(-2, 2, width=32), max_size=4000))},
            {"type": "Audio", "pcm": draw(st.binary(max_size=8000))},
            {"type": "Marker", "id": draw(st.integers(-2**63, 2**63 - 1))},
            {"type": "OggOpus", "data": draw(ogg_bytes())},
            {"type": "Init"}]))
        return msgpack.packb(message, use_bin_type=True, use_single_float=True)
    if kind == "raw":
        return draw(binary)
    if kind == "text":
        return draw(text)
    message = {"type": draw(st.sampled_from(["Audio", "OggOpus", "Marker", "Init"]) | any_value)}
    if draw(st.booleans()):
        message["pcm"] = draw(st.lists(st.floats(width=32), max_size=2000) | any_value)
    if draw(st.booleans()):
        message["data"] = draw(ogg_bytes() | any_value)
    if draw(st.booleans()):
        message["id"] = draw(any_value)
    message.update(draw(st.dictionaries(st.text(max_size=8) | st.integers(-2**63, 2**63 - 1), any_value, max_size=3)))
    return msgpack.packb(message, use_bin_type=True)


seed_messages = st.one_of(
    st.lists(binary | text, max_size=6),
    st.builds(split, ogg_bytes(), st.lists(st.integers(0, 2000), max_size=8)),
).flatmap(lambda messages: st.sampled_from([messages, messages + [b""]]))
events_query = st.sampled_from(["", "?format=opus", "?format=pcm_f32le", "?format=pcm_s16le&sample_rate=16000",
                                "?format=pcm_s16le&sample_rate=44100&steps=true"]) | st.builds(
    lambda key, value: f"?{key}={quote(value)}", st.sampled_from(["format", "sample_rate", "steps"]),
    st.text(max_size=12))
events_messages = st.lists(binary | text | json_control() | ogg_bytes(), max_size=8)
kyutai_messages = st.lists(kyutai_message(), max_size=6)


# ------------------------------------------------------------------------------------------------ the checks
async def ws_example(server, path: str, messages: list) -> tuple[int | None, str]:
    """Send the messages, give the server a moment to answer, then leave (closing normally if it did not)."""
    async with websockets.connect(server.ws + path, max_size=None, open_timeout=30) as ws:
        try:
            for message in messages:
                await ws.send(message)
        except websockets.ConnectionClosed:
            pass
        try:
            async with asyncio.timeout(0.5):
                async for _ in ws:
                    pass
        except (websockets.ConnectionClosed, TimeoutError):
            pass
    return ws.close_code, ws.close_reason or ""


async def idle(server, client: httpx.AsyncClient, timeout: float = 30.0) -> None:
    """Healthy, and every slot back (the server frees a slot once it has seen the client go)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = (await client.get(server.http + "/status")).json()
        assert status["healthy"], status
        if status["slots_in_use"] == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, f"slots still in use: {status}"
        await asyncio.sleep(0.02)


def check_ws(loop, server, path: str, messages: list) -> None:
    async def example():
        code, reason = await ws_example(server, path, messages)
        event(f"close {code}")
        assert code in WS_CODES, (code, reason)
        async with httpx.AsyncClient(timeout=10) as client:
            await idle(server, client)

    run(loop, example())


@fuzz
@given(messages=seed_messages)
def test_fuzz_seed_protocol(server, loop, messages):
    check_ws(loop, server, "/ws", messages)


@fuzz
@given(query=events_query, messages=events_messages)
def test_fuzz_events_protocol(server, loop, query, messages):
    check_ws(loop, server, "/v1/stream" + query, messages)


@fuzz
@given(messages=kyutai_messages)
def test_fuzz_kyutai_protocol(server, loop, messages):
    check_ws(loop, server, "/api/asr-streaming", messages)


@st.composite
def file_bytes(draw) -> bytes:
    """Arbitrary bytes, or bytes behind a real-looking header (WAV with arbitrary fields, Ogg, FLAC, MP3 tags)."""
    kind = draw(st.sampled_from(["raw", "wav", "ogg", "magic"]))
    tail = draw(st.binary(max_size=1500))
    if kind == "raw":
        return tail
    if kind == "ogg":
        return draw(ogg_bytes()) + tail
    if kind == "magic":
        return draw(st.sampled_from([b"fLaC", b"ID3\x03\x00\x00\x00\x00\x00\x00", b"\xff\xfb\x90\x00", b"RIFF"])) + tail
    rate = draw(st.sampled_from([0, 1, 7999, 8000, 16000, 2**32 - 1]) | st.integers(0, 2**32 - 1))
    channels = draw(st.integers(0, 0xFFFF))
    bits = draw(st.sampled_from([0, 8, 16, 24, 32, 7, 0xFFFF]))
    fmt = draw(st.sampled_from([1, 3, 0, 0xFFFE, 2]))
    size = draw(st.sampled_from([len(tail), 0, 2**32 - 1]) | st.integers(0, 2**32 - 1))
    header = (b"RIFF" + struct.pack("<I", (36 + size) & 0xFFFFFFFF) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, fmt, channels, rate, (rate * 2) & 0xFFFFFFFF, 2, bits)
              + b"data" + struct.pack("<I", size))
    return header + tail


@fuzz
@given(body=file_bytes())
def test_fuzz_kyutai_post(server, loop, body):
    async def example():
        async with httpx.AsyncClient(timeout=EXAMPLE_TIMEOUT) as client:
            response = await client.post(server.http + "/api/asr-streaming", content=body)
            event(f"HTTP {response.status_code}")
            assert response.status_code in POST_STATUS, (response.status_code, response.text[:300])
            if response.status_code == 200:
                assert all(m["type"] in ("Word", "EndWord") for m in response.json())
            else:
                assert response.json()["detail"]
            await idle(server, client)

    run(loop, example())


@fuzz
@given(body=file_bytes(), filename=st.text(max_size=30), response_format=st.sampled_from(["json", "text", "srt"])
       | st.text(max_size=10), multipart=st.sampled_from([True, True, True, False]), content_type=st.text(max_size=40))
def test_fuzz_openai_transcriptions(server, loop, body, filename, response_format, multipart, content_type):
    async def example():
        async with httpx.AsyncClient(timeout=EXAMPLE_TIMEOUT) as client:
            if multipart:
                response = await client.post(server.http + "/v1/audio/transcriptions",
                                             files={"file": (filename, body)},
                                             data={"model": "x", "response_format": response_format})
            else:
                sendable = content_type.isascii() and content_type.isprintable()
                headers = {"content-type": content_type} if sendable else {}
                response = await client.post(server.http + "/v1/audio/transcriptions", content=body, headers=headers)
            event(f"HTTP {response.status_code}")
            assert response.status_code in OPENAI_STATUS, (response.status_code, response.text[:300])
            await idle(server, client)

    run(loop, example())


def test_streams_are_exact_after_fuzzing(server, loop, reference, sounds):
    """After all the fuzzing, a normal stream still gets exactly its reference words."""
    pcm = sounds(1.2, 111)

    async def stream():
        return [event async for event in Client(server.ws).stream(pcm)]

    assert words_of(run(loop, stream())) == ref_words(reference, pcm)
