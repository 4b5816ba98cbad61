"""Bad input on every protocol, over real sockets: each case gets a clear error (close code and reason, an Error
message, an HTTP status with a detail) or is handled correctly, and a well-behaved neighbour stream running at the
same time keeps exactly its reference transcript. After each group the server is healthy with every slot free."""

from __future__ import annotations

import asyncio
import io
import json
import random
import struct
import subprocess

import httpx
import msgpack
import numpy as np
import pytest
import soundfile
import websockets

from kyutai_stt.audio.decode import OggOpusDecoder, load_audio_file, ogg_crc
from kyutai_stt.audio.resample import resample
from kyutai_stt.client import parse_event

from .conftest import ensure_debian_packages, start_server
from .hardening import Closed, Neighbour, exchange, gather, ref_words, wait_idle, words_of
from .helpers import expected_pieces, opus_pages_and_decoded, regroup

MAX_MESSAGE = 64 * 1024
MAX_UPLOAD = 1024 * 1024
MAX_SECONDS = 10.0


@pytest.fixture(scope="module")
def hard(checkpoint_dir):
    """A server with small bounds, so that each can be crossed cheaply."""
    with start_server(checkpoint_dir, slots=8, max_message_bytes=MAX_MESSAGE, max_upload_bytes=MAX_UPLOAD,
                      max_session_s=MAX_SECONDS, idle_timeout_s=120) as running:
        yield running


@pytest.fixture(scope="module")
def clip(sounds) -> np.ndarray:
    return sounds(1.5, 101)


def wav_bytes(pcm: np.ndarray, rate: int = 24000, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def wav_header(rate: int, data_bytes: int) -> bytes:
    """A 16-bit mono WAV header declaring ``rate`` (any value, even nonsense)."""
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, (rate * 2) & 0xFFFFFFFF, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


def events_of(closed: Closed) -> list:
    return [parse_event(m) for m in closed.received]


def kyutai_messages(closed: Closed) -> list[dict]:
    return [msgpack.unpackb(m) for m in closed.received]


def assert_kyutai_error(closed: Closed, text: str) -> None:
    """moshi-server clients see an Error message, then the close."""
    messages = kyutai_messages(closed)
    assert closed.code == 1007, closed
    assert messages[0] == {"type": "Ready"}
    assert messages[-1]["type"] == "Error" and text in messages[-1]["message"], messages[-1]
    assert text in closed.reason


async def post_both(server, body: bytes, filename: str = "audio.wav") -> tuple[httpx.Response, httpx.Response]:
    """The same bytes to moshi-server's POST and to the OpenAI endpoint."""
    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(
            client.post(server.http + "/api/asr-streaming", content=body),
            client.post(server.http + "/v1/audio/transcriptions", files={"file": (filename, body)},
                        data={"response_format": "verbose_json", "timestamp_granularities[]": "word"}))


def detail(response: httpx.Response) -> str:
    body = response.json()
    return body["detail"] if "detail" in body else body["error"]["message"]


# ------------------------------------------------------------------------------------------------ random bytes
async def test_random_bytes(hard, reference, clip):
    noise = random.Random(1).randbytes(3001)
    pcm_noise = random.Random(2).randbytes(24000)  # as 16-bit PCM these bytes are 0.5 s of (loud) noise
    async with Neighbour(hard, reference, clip):
        seed, seed_oggs, opus, nan, kyutai, as_pcm = await gather(
            exchange(hard.ws + "/ws", [noise]),
            exchange(hard.ws + "/ws", [b"OggS" + noise]),
            exchange(hard.ws + "/v1/stream", [noise]),
            exchange(hard.ws + "/v1/stream?format=pcm_f32le", [np.array([0.1, np.nan, 0.2], "<f4").tobytes()]),
            exchange(hard.ws + "/api/asr-streaming", [noise]),
            exchange(hard.ws + "/v1/stream?format=pcm_s16le", [pcm_noise, json.dumps({"type": "end"})]))
        post, openai = await post_both(hard, noise)
    assert (seed.code, seed.reason) == (1007, "not an Ogg stream (expected Ogg/Opus pages starting with 'OggS')")
    assert seed_oggs.code == 1007 and seed_oggs.reason.startswith("corrupt Ogg data"), seed_oggs
    assert (opus.code, opus.reason) == (seed.code, seed.reason)
    assert nan.code == 1007 and "NaN" in nan.reason
    assert_kyutai_error(kyutai, "invalid message")
    # random bytes declared as 16-bit PCM are valid audio: transcribed like any other
    assert as_pcm.code == 1000
    heard = np.frombuffer(pcm_noise, "<i2").astype(np.float32) / 32768
    assert words_of(events_of(as_pcm)) == ref_words(reference, heard)
    assert post.status_code == 400 and "could not decode the file as audio" in detail(post)
    assert openai.status_code == 400 and "could not decode" in detail(openai)
    await wait_idle(hard)


# ------------------------------------------------------------------------------------------------ Ogg damage
def with_serial(data: bytes, serial: int) -> bytes:
    """The same Ogg pages, moved to another logical stream (checksums recomputed)."""
    out, position = bytearray(), 0
    while position < len(data):
        segments = data[position + 26]
        end = position + 27 + segments + sum(data[position + 27:position + 27 + segments])
        page = bytearray(data[position:end])
        page[14:18] = struct.pack("<I", serial)
        page[22:26] = struct.pack("<I", ogg_crc(bytes(page)))
        out += page
        position = end
    return bytes(out)


def ogg_page_count(data: bytes) -> int:
    """Ogg pages that start in ``data`` (walking the page headers; the last may be cut)."""
    count = position = 0
    while position < len(data):
        assert data[position:position + 4] == b"OggS"
        segments = data[position + 26]
        position += 27 + segments + sum(data[position + 27:position + 27 + segments])
        count += 1
    return count


async def test_corrupt_and_truncated_ogg(hard, reference, clip, sounds):
    pages, _ = opus_pages_and_decoded(sounds(2.0, 102))
    data = b"".join(pages)
    middle = sum(len(p) for p in pages[:8]) + len(pages[8]) // 2  # inside the body of one page
    flipped = bytearray(data)
    flipped[middle] ^= 0x10
    headerless = pages[1:]  # pages[0] holds the OpusHead and OpusTags pages
    garbage = pages[:4] + [b"garbage!"] + pages[4:]
    other_pages, other_decoded = opus_pages_and_decoded(sounds(1.0, 106))
    chained = pages + other_pages  # a second Opus stream after the first, as an encoder restart sends
    chained_heard = np.concatenate([OggOpusDecoder().feed(data), other_decoded])
    interleaved = pages[:3] + [with_serial(other_pages[2], 7)] + pages[3:]  # a page of another logical stream
    truncated = data[:middle]  # ends in the middle of a page
    decoder = OggOpusDecoder()
    heard = decoder.feed(truncated)  # what any decoder gets from the complete pages
    assert 0 < len(heard) < 24000 * 2
    rng = random.Random(3)
    opus_messages = [msgpack.packb({"type": "OggOpus", "data": p}) for p in regroup(bytes(flipped), rng)]
    async with Neighbour(hard, reference, clip, protocol="seed"):
        results = await gather(
            exchange(hard.ws + "/ws", regroup(bytes(flipped), rng)),
            exchange(hard.ws + "/v1/stream", [bytes(flipped)]),
            exchange(hard.ws + "/api/asr-streaming", opus_messages),
            exchange(hard.ws + "/ws", headerless),
            exchange(hard.ws + "/ws", garbage),
            exchange(hard.ws + "/ws", regroup(truncated, rng) + [b""]),
            exchange(hard.ws + "/v1/stream", regroup(truncated, rng) + [json.dumps({"type": "end"})]),
            exchange(hard.ws + "/ws", regroup(b"".join(chained), rng) + [b""]),
            exchange(hard.ws + "/ws", interleaved))
    seed_flip, events_flip, kyutai_flip, no_header, between, seed_cut, events_cut, seed_chained, mixed = results
    damaged = f"page {ogg_page_count(data[:middle])}"  # the page ``middle`` falls in
    for closed in (seed_flip, events_flip):
        assert (closed.code, closed.reason) == (1007, f"corrupt Ogg data: {damaged} fails its checksum"), closed
    assert_kyutai_error(kyutai_flip, f"{damaged} fails its checksum")
    assert (no_header.code, no_header.reason) == (1007, "the Ogg stream does not start with its header page (OpusHead)")
    after = f"page {ogg_page_count(b''.join(pages[:4])) + 1}"
    assert (between.code, between.reason) == (1007, f"corrupt Ogg data: {after} does not start with 'OggS'")
    # cut in the middle of a page, then ended: the complete pages are transcribed, the partial one dropped
    assert seed_cut.code == 1000 and seed_cut.received[-1] == b"\x00"
    want = expected_pieces(reference.model, reference.outputs(heard))
    assert want and [m[1:].decode() for m in seed_cut.received[:-1]] == want
    assert events_cut.code == 1000 and words_of(events_of(events_cut)) == ref_words(reference, heard)
    # chained streams are decoded one after the other
    assert seed_chained.code == 1000 and seed_chained.received[-1] == b"\x00"
    want = expected_pieces(reference.model, reference.outputs(chained_heard))
    assert [m[1:].decode() for m in seed_chained.received[:-1]] == want
    assert (mixed.code, mixed.reason) == (1007, "interleaved (multiplexed) Ogg streams are not supported")
    await wait_idle(hard)


# ------------------------------------------------------------------------------------------------ other codecs
@pytest.fixture(scope="module")
def encoded(tmp_path_factory, sounds) -> dict:
    """Ogg Vorbis, Ogg FLAC, Opus encoded from 8, 16 and 44.1 kHz input, stereo and 6-channel Opus."""
    assert ensure_debian_packages(("opusenc", "opus-tools"), ("flac", "flac")), "opus-tools and flac are needed"
    folder = tmp_path_factory.mktemp("encoded")
    pcm = sounds(1.5, 103)
    files: dict = {}
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, 24000, format="OGG", subtype="VORBIS")
    files["vorbis"] = buffer.getvalue()
    (folder / "clip.wav").write_bytes(wav_bytes(pcm))
    subprocess.run(["flac", "--ogg", "-s", "-f", str(folder / "clip.wav"), "-o", str(folder / "clip.oga")], check=True)
    files["flac"] = (folder / "clip.oga").read_bytes()
    for rate in (8000, 16000, 44100):
        raw = folder / f"clip{rate}.raw"
        raw.write_bytes((np.clip(resample(pcm, 24000, rate), -1, 1) * 32767).astype("<i2").tobytes())
        out = folder / f"clip{rate}.opus"
        subprocess.run(["opusenc", "--quiet", "--raw", "--raw-rate", str(rate), "--raw-chan", "1", str(raw), str(out)],
                       check=True)
        files[f"opus{rate}"] = out.read_bytes()
    at48 = resample(pcm, 24000, 48000)
    other = resample(sounds(1.5, 104), 24000, 48000)
    layouts = {"mono": [at48], "left": [at48, 0 * at48], "stereo": [at48, other], "six": [at48] * 6}
    for name, channels in layouts.items():
        (folder / f"{name}.wav").write_bytes(wav_bytes(np.stack(channels, 1), 48000))
        subprocess.run(["opusenc", "--quiet", str(folder / f"{name}.wav"), str(folder / f"{name}.opus")], check=True)
        files[name] = (folder / f"{name}.opus").read_bytes()
    files["source"] = pcm
    return files


async def test_other_codecs_in_ogg(hard, reference, clip, encoded):
    cases = {"vorbis": "the Ogg stream carries Vorbis, not Opus: send Ogg/Opus",
             "flac": "the Ogg stream carries FLAC, not Opus: send Ogg/Opus",
             "six": "Opus with 6 channels (mapping family 1) is not supported: send mono or stereo"}
    async with Neighbour(hard, reference, clip):
        streamed = await gather(*(
            exchange(hard.ws + path, [encoded[name][i:i + 4000] for i in range(0, len(encoded[name]), 4000)])
            for name in cases for path in ("/ws", "/v1/stream")))
        kyutai = await gather(*(
            exchange(hard.ws + "/api/asr-streaming", [msgpack.packb({"type": "OggOpus", "data": encoded[name][:8000]})])
            for name in cases))
        # whole files over HTTP are another matter: Vorbis and FLAC are audio files we read
        vorbis_post, _ = await post_both(hard, encoded["vorbis"], "clip.ogg")
        _, flac_openai = await post_both(hard, encoded["flac"], "clip.oga")
    for closed, reason in zip(streamed, [reason for reason in cases.values() for _ in range(2)]):
        assert (closed.code, closed.reason) == (1007, reason)
    for closed, reason in zip(kyutai, cases.values()):
        assert_kyutai_error(closed, reason)
    assert vorbis_post.status_code == 200
    vorbis_pcm = load_audio_file_bytes(encoded["vorbis"], ".ogg")
    got = [(m["text"], round(m["start_time"], 4)) for m in vorbis_post.json() if m["type"] == "Word"]
    assert got == [(w[0], w[1]) for w in ref_words(reference, vorbis_pcm)]
    assert flac_openai.status_code == 200
    flac_pcm = load_audio_file_bytes(encoded["flac"], ".oga")
    assert np.abs(flac_pcm - encoded["source"]).max() < 1e-3  # lossless: the 16-bit clip
    got = [(w["word"], round(w["start"], 4), round(w["end"], 4)) for w in flac_openai.json()["words"]]
    assert got == ref_words(reference, flac_pcm)
    await wait_idle(hard)


def load_audio_file_bytes(data: bytes, suffix: str) -> np.ndarray:
    import os
    import tempfile

    fd, name = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_audio_file(name)
    finally:
        os.unlink(name)


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 800) -> float:
    """Largest normalised correlation of two signals over small lags (the codec adds a short delay)."""
    n = min(len(a), len(b)) - max_lag
    best = 0.0
    for lag in range(0, max_lag, 4):
        x, y = a[lag:lag + n], b[:n]
        best = max(best, float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-9)))
    return best


async def test_opus_input_rates_and_stereo(hard, reference, clip, encoded):
    """Opus encoded from 8, 16 and 44.1 kHz input decodes at 24 kHz to the same sound and is transcribed exactly
    like that sound; stereo is downmixed by libopus to the mean of the channels."""
    source = encoded["source"]
    decoded = {name: OggOpusDecoder().feed(encoded[name]) for name in ("opus8000", "opus16000", "opus44100", "mono",
                                                                       "left", "stereo")}
    for rate in (8000, 16000, 44100):
        band_limited = resample(resample(source, 24000, rate), rate, 24000)
        assert best_correlation(decoded[f"opus{rate}"], band_limited) > 0.9, rate
        assert abs(len(decoded[f"opus{rate}"]) - len(source)) < 2000
    # left channel only: half the amplitude of the same sound in mono ((L + R) / 2 with R silent)
    assert best_correlation(decoded["left"], decoded["mono"]) > 0.95
    ratio = np.linalg.norm(decoded["left"]) / np.linalg.norm(decoded["mono"])
    assert 0.45 < ratio < 0.55, ratio
    rng = random.Random(4)
    async with Neighbour(hard, reference, clip):
        results = await gather(
            *(exchange(hard.ws + "/ws", regroup(encoded[f"opus{rate}"], rng) + [b""]) for rate in (8000, 16000, 44100)),
            exchange(hard.ws + "/v1/stream", regroup(encoded["stereo"], rng) + [json.dumps({"type": "end"})]))
    for closed, rate in zip(results[:3], (8000, 16000, 44100)):
        assert closed.code == 1000 and closed.received[-1] == b"\x00"
        want = expected_pieces(reference.model, reference.outputs(decoded[f"opus{rate}"]))
        assert want and [m[1:].decode() for m in closed.received[:-1]] == want, rate
    stereo = results[3]
    assert stereo.code == 1000
    assert words_of(events_of(stereo)) == ref_words(reference, decoded["stereo"])
    await wait_idle(hard)


# ------------------------------------------------------------------------------------------------ wrong messages
async def test_text_frames_malformed_messages_and_wrong_types(hard, reference, clip):
    pack = msgpack.packb
    events_cases = {
        "not json": (1007, "invalid JSON control"),
        "[" * 50_000: (1007, "invalid JSON control"),  # deeper than the JSON parser recurses
        '{"type": "marker", "id": ' + "9" * 5000 + "}": (1007, "invalid JSON control"),  # past int digit limit
        '{"type": "marker", "id": 1.5}': (1008, "unknown control"),
        '{"type": "marker", "id": true}': (1008, "unknown control"),
        '{"type": "marker", "id": "7"}': (1008, "unknown control"),
        '{"type": "nope"}': (1008, "unknown control"),
        "[1, 2]": (1008, "unknown control"),
    }
    kyutai_cases = {
        b"\xc1": "malformed msgpack",
        b"\x91" * 50_000: "malformed msgpack",  # nested deeper than msgpack unpacks
        pack([1, 2]): "each message must be a msgpack map with a 'type'",
        pack({"type": 5}): "each message must be a msgpack map with a 'type'",
        pack({"pcm": [0.0]}): "each message must be a msgpack map with a 'type'",
        pack({"type": "Nope"}): "unknown message type 'Nope'",
        pack({"type": "Audio"}): "Audio.pcm must be a list of floats",
        pack({"type": "Audio", "pcm": "0.1, 0.2"}): "Audio.pcm must be a list of floats",
        pack({"type": "Audio", "pcm": 0.5}): "Audio.pcm must be a list of floats",
        pack({"type": "Audio", "pcm": [[0.1], [0.2]]}): "Audio.pcm must be a flat list of floats",
        pack({"type": "Audio", "pcm": [0.1, "x"]}): "could not convert string to float",
        pack({"type": "Audio", "pcm": [0.1, {}]}): "invalid message",
        pack({"type": "Audio", "pcm": [0.1, float("nan")]}): "NaN or infinite",
        pack({"type": "Audio", "pcm": [float("-inf")]}): "NaN or infinite",
        pack({"type": "Marker", "id": 1.5}): "Marker.id must be an integer",
        pack({"type": "Marker", "id": True}): "Marker.id must be an integer",
        pack({"type": "Marker"}): "Marker.id must be an integer",
        pack({"type": "OggOpus", "data": "text"}): "OggOpus.data must be bytes",
    }
    query_cases = ["?sample_rate=abc", "?sample_rate=16000.5", "?sample_rate=4000", "?format=mp4", "?steps=maybe"]
    async with Neighbour(hard, reference, clip):
        text_on_seed = await exchange(hard.ws + "/ws", ["hello"])
        events = await gather(*(exchange(hard.ws + "/v1/stream", [m]) for m in events_cases))
        kyutai = await gather(*(exchange(hard.ws + "/api/asr-streaming", [m]) for m in kyutai_cases))
        queries = await gather(*(exchange(hard.ws + "/v1/stream" + q, []) for q in query_cases))
        # moshi-server ignores text frames: the stream goes on
        async with websockets.connect(hard.ws + "/api/asr-streaming") as ws:
            assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
            await ws.send("a text frame")
            await ws.send(pack({"type": "Init"}))
            assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
    assert (text_on_seed.code, text_on_seed.reason) == (1003, "this endpoint takes binary Ogg/Opus messages, not text")
    for closed, (code, text) in zip(events, events_cases.values()):
        assert closed.code == code and closed.reason.startswith(text), closed
    for closed, text in zip(kyutai, kyutai_cases.values()):
        assert_kyutai_error(closed, text)
    for closed in queries:
        assert closed.code == 1008 and closed.reason.startswith("format must be one of"), closed
    await wait_idle(hard)


async def test_huge_and_nan_pcm(hard, reference, clip, sounds):
    """Finite samples beyond [-1, 1] are clipped (a sound card would clip them too); NaN and infinity are refused."""
    loud = sounds(1.0, 105) * 1e6
    async with Neighbour(hard, reference, clip, protocol="seed"):
        clipped, infinite, s16 = await gather(
            exchange(hard.ws + "/v1/stream?format=pcm_f32le",
                     [loud[i:i + 5000].astype("<f4").tobytes() for i in range(0, len(loud), 5000)]
                     + [json.dumps({"type": "end"})]),
            exchange(hard.ws + "/v1/stream?format=pcm_f32le", [np.array([1.0, np.inf], "<f4").tobytes()]),
            exchange(hard.ws + "/v1/stream?format=pcm_s16le&sample_rate=24000",
                     [np.array([-32768, 32767] * 4000, "<i2").tobytes(), json.dumps({"type": "end"})]))
        # moshi-server's msgpack floats: huge ones are clipped too, the stream goes on and the marker comes back
        async with websockets.connect(hard.ws + "/api/asr-streaming") as ws:
            assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
            await ws.send(msgpack.packb({"type": "Audio", "pcm": [1e30, -1e30] * 960}, use_single_float=True))
            await ws.send(msgpack.packb({"type": "Marker", "id": 9}))
            messages = []
            for _ in range(1200):
                if messages and messages[-1] == {"type": "Marker", "id": 9}:
                    break
                await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 1920}, use_single_float=True))
                try:
                    messages.append(msgpack.unpackb(await asyncio.wait_for(ws.recv(), 0.05)))
                except TimeoutError:
                    pass
            assert messages[-1] == {"type": "Marker", "id": 9}
            assert not [m for m in messages if m["type"] == "Error"]
    assert clipped.code == 1000
    assert words_of(events_of(clipped)) == ref_words(reference, np.clip(loud, -1, 1))
    assert infinite.code == 1007 and "NaN or infinite" in infinite.reason
    assert s16.code == 1000 and events_of(s16)[-1].type == "end"
    await wait_idle(hard)


# ------------------------------------------------------------------------------------------------ sizes
async def test_oversized_messages_and_files(hard, reference, clip):
    too_big = bytes(MAX_MESSAGE + 1)
    exactly = clip[: MAX_MESSAGE // 4]  # a message of exactly the limit is taken
    long_wav = wav_header(8000, int(MAX_SECONDS + 2) * 16000) + bytes(int(MAX_SECONDS + 2) * 16000)
    async with Neighbour(hard, reference, clip):
        seed, text, kyutai, at_limit = await gather(
            exchange(hard.ws + "/ws", [too_big]),
            exchange(hard.ws + "/v1/stream", ["x" * (MAX_MESSAGE + 1)]),
            exchange(hard.ws + "/api/asr-streaming", [msgpack.packb({"type": "OggOpus", "data": too_big})]),
            exchange(hard.ws + "/v1/stream?format=pcm_f32le", [exactly.astype("<f4").tobytes(),
                                                              json.dumps({"type": "end"})]))
        upload = await post_both(hard, bytes(MAX_UPLOAD + 1))
        long_file = await post_both(hard, long_wav)
        one_hertz = await post_both(hard, wav_header(1, 20000) + bytes(20000))  # 10000 s of audio in 20 kB
        zero_hertz = await post_both(hard, wav_header(0, 2000) + bytes(2000))  # makes the Rust decoder panic
        nul_name = await post_both(hard, wav_bytes(clip[:4800]), "clip.\x00wav")
    for closed in (seed, text, kyutai):
        assert closed.code == 1009, closed
    assert at_limit.code == 1000 and words_of(events_of(at_limit)) == ref_words(reference, exactly)
    for response in upload:
        assert response.status_code == 413 and f"larger than {MAX_UPLOAD} bytes" in detail(response)
    for response in long_file:
        assert response.status_code == 413 and f"longer than the {MAX_SECONDS:g} s limit" in detail(response)
    for response in one_hertz:
        assert response.status_code == 400 and "unsupported sample rate 1 Hz" in detail(response)
    for response in zero_hertz:
        assert response.status_code == 400 and "could not decode" in detail(response)
    assert [r.status_code for r in nul_name] == [200, 200]
    await wait_idle(hard)


# ------------------------------------------------------------------------------------------------ empty messages
async def test_empty_messages(hard, reference, clip):
    end = json.dumps({"type": "end"})
    pcm = clip.astype("<f4").tobytes()
    async with Neighbour(hard, reference, clip, protocol="seed"):
        seed, opus, pcm_events, text, kyutai = await gather(
            exchange(hard.ws + "/ws", [b""]),  # the seed protocol's end of audio, before any audio
            exchange(hard.ws + "/v1/stream", [b"", b"", end]),
            exchange(hard.ws + "/v1/stream?format=pcm_f32le",
                     [b"", pcm[:1001], b""] + [pcm[i:i + 60_000] for i in range(1001, len(pcm), 60_000)] + [b"", end]),
            exchange(hard.ws + "/v1/stream", [""]),
            exchange(hard.ws + "/api/asr-streaming", [b""]))
        async with websockets.connect(hard.ws + "/api/asr-streaming") as ws:
            assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
            await ws.send("")  # an empty text frame is a text frame: ignored
            await ws.send(msgpack.packb({"type": "Init"}))
            assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
        post, openai = await post_both(hard, b"")
    # no audio at all ends cleanly with no words: there is nothing to flush (the end's flush silence is not fed to
    # the model, whose random weights spelt "words" in it; the file endpoints refuse empty audio)
    assert seed.code == 1000 and seed.received == [b"\x00"]
    assert opus.code == 1000 and events_of(opus)[-1].type == "end" and events_of(opus)[-1].duration == 0
    assert words_of(events_of(opus)) == []
    assert pcm_events.code == 1000 and words_of(events_of(pcm_events)) == ref_words(reference, clip)
    assert text.code == 1008 and text.reason.startswith("unknown control")
    assert_kyutai_error(kyutai, "malformed msgpack")
    assert post.status_code == 400 and detail(post) == "empty audio file"
    assert openai.status_code == 400 and detail(openai) == "empty audio file"
    await wait_idle(hard)
