"""Nothing lost at any client pace: clients far ahead of the engine, clients that read only at the end, an engine
slower than real time, and closes the server initiates. Real server (uvicorn), real `websockets` clients speaking
Kyutai's msgpack protocol as Kyutai's own scripts do, words compared with the single-stream reference."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time

import httpx
import msgpack
import numpy as np
import pytest
import websockets

from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE
from kyutai_stt.engine.contract import ActiveStreams
from kyutai_stt.messages.events import Word
from kyutai_stt.serve.pace import RealTimeMonitor
from kyutai_stt.stream.words import WordAssembler, pair_words


from .conftest import start_server
from .helpers import expected_events

PING_S = 1.0  # uvicorn closes a connection whose pong is 2 s late
# Long enough that a client held back by TCP waits far longer than the ping timeout for its pong to be read (with
# the engine at real pace, the 2 s timeout passes after ~3 s of audio); 60 s in the issue, 20 s here for speed
# (export KYUTAI_STT_TEST_LONG_S=60 to run the issue's length).
LONG_S = float(os.environ.get("KYUTAI_STT_TEST_LONG_S", "20"))


@pytest.fixture(scope="module")
def minute(speech) -> np.ndarray:
    """``LONG_S`` of speech (the generated sentence, over and over)."""
    return np.resize(speech, int(LONG_S * SAMPLE_RATE)).astype(np.float32)


def words_before_marker(reference, pcm: np.ndarray) -> list[tuple[str, float]]:
    """(text, start) of the words a Kyutai client gets before the marker sent after ``pcm`` comes back: the
    reference's words from the steps before the marker's frame (the audio after the marker is silence, as the
    reference's flush)."""
    model = reference.model
    lead = model.delay_frames + model.prefix_frames
    needed = math.ceil(len(pcm) / FRAME_SIZE) + lead
    outputs = reference.outputs(pcm)  # 2 frames per Mimi call, as the server (see reference_outputs)
    assert len(outputs) >= needed
    assembler = WordAssembler(model.tokenizer.id_to_piece, lead)
    words = [e for out in outputs[:needed] for e in assembler.feed(out.frame, out.token) if isinstance(e, Word)]
    return [(w.text, w.start_time) for w in words]


def audio_message(pcm) -> bytes:
    return msgpack.packb({"type": "Audio", "pcm": [float(x) for x in pcm]}, use_single_float=True)


async def words_until_marker(ws, words: list[tuple[str, float]]) -> bool:
    """Read Kyutai messages into ``words`` (text, start) until the marker comes back (True), or the connection
    ends normally before (False; ``ConnectionClosedError`` if it was cut off)."""
    async for message in ws:
        data = msgpack.unpackb(message)
        if data["type"] == "Word":
            words.append((data["text"], data["start_time"]))
        if data["type"] == "Marker":
            return True
    return False


async def kyutai_full_speed_client(url: str, pcm: np.ndarray) -> tuple[list[tuple[str, float]], int | None]:
    """As Kyutai's ``scripts/stt_from_file_rust_server.py --rtf 1000``: 1 s of silence, the audio frame by frame at
    full speed, 5 s of silence, a marker, then up to 35 s of silence, reading concurrently until the marker."""
    async with websockets.connect(url + "/api/asr-streaming") as ws:
        words: list[tuple[str, float]] = []

        async def send():
            await ws.send(audio_message(np.zeros(SAMPLE_RATE)))
            for i in range(0, len(pcm), FRAME_SIZE):
                await ws.send(audio_message(pcm[i:i + FRAME_SIZE]))
                await asyncio.sleep(0.001)
            for _ in range(5):
                await ws.send(audio_message(np.zeros(SAMPLE_RATE)))
            await ws.send(msgpack.packb({"type": "Marker", "id": 0}))
            for _ in range(35):
                await ws.send(audio_message(np.zeros(SAMPLE_RATE)))

        sender = asyncio.create_task(send())
        await words_until_marker(ws, words)
        await sender
    return words, ws.close_code


async def kyutai_read_at_end_client(url: str, pcm: np.ndarray) -> tuple[list[tuple[str, float]], int | None]:
    """As unmute's file example: sends everything (audio, 5 s of silence, a marker, 20 s of silence) without
    reading, then reads until the marker."""
    async with websockets.connect(url + "/api/asr-streaming") as ws:
        words: list[tuple[str, float]] = []
        await ws.send(audio_message(np.zeros(SAMPLE_RATE)))
        for i in range(0, len(pcm), FRAME_SIZE):
            await ws.send(audio_message(pcm[i:i + FRAME_SIZE]))
        for _ in range(5):
            await ws.send(audio_message(np.zeros(SAMPLE_RATE)))
        await ws.send(msgpack.packb({"type": "Marker", "id": 0}))
        for _ in range(20):
            await ws.send(audio_message(np.zeros(SAMPLE_RATE)))
        await words_until_marker(ws, words)
    return words, ws.close_code


@pytest.mark.slow  # long audio or many connections: `uv run pytest -m slow` (CI runs it)
@pytest.mark.parametrize("client", [kyutai_full_speed_client, kyutai_read_at_end_client])
async def test_kyutai_clients_ahead_of_the_engine_get_every_word(checkpoint_dir, reference, minute, client):
    """Long speech at full speed, 1 s keepalive pings, one slot, a small engine buffer: the client is read at
    once (its audio waits in the spool, its pongs keep flowing) and gets exactly the file mode's words. (Reading
    the socket no faster than the engine, as before, closed both with 1011 "keepalive ping timeout".)"""
    heard = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), minute, np.zeros(5 * SAMPLE_RATE, np.float32)])
    with start_server(checkpoint_dir, slots=1, ping_interval_s=PING_S, max_buffered_audio_s=0.5,
                      spool_memory_s=5.0) as running:
        words, code = await client(running.ws, minute)
    assert code == 1000
    assert words == words_before_marker(reference, heard)


async def test_real_time_client_on_a_slow_engine_is_slowed_complete_and_reported(checkpoint_dir, reference, sounds,
                                                                                  caplog):
    """The engine made slower than real time (each step takes 2.5x the audio it advances): a client streaming at
    real pace keeps its connection (1 s pings), gets every word, later; /status, /metrics and the log say so."""
    clip = sounds(6.0, 31)
    # steps of 2 frames only: with bigger steps for a backlog (max_frames_per_step) a step that sleeps a fixed time
    # carries more audio, and the engine would no longer be slower than real time
    with start_server(checkpoint_dir, slots=2, ping_interval_s=PING_S, max_buffered_audio_s=0.5,
                      max_frames_per_step=2) as running:
        step_audio = running.engine.frames_per_step * FRAME_SIZE / SAMPLE_RATE
        running.engine.fault_injector = lambda: time.sleep(2.5 * step_audio)
        pcm = (np.clip(clip, -1, 1) * 32767).astype("<i2")
        url = running.ws + "/v1/stream?format=pcm_s16le&sample_rate=24000"
        status: dict = {}
        metrics = ""
        with caplog.at_level(logging.WARNING, logger="kyutai_stt.serve.pace"):
            async with websockets.connect(url) as ws:
                started = time.monotonic()
                for i in range(0, len(pcm), FRAME_SIZE):
                    await ws.send(pcm[i:i + FRAME_SIZE].tobytes())
                    await asyncio.sleep(max(0.0, started + (i + FRAME_SIZE) / SAMPLE_RATE - time.monotonic()))
                async with httpx.AsyncClient() as http:
                    status = (await http.get(running.http + "/status")).json()
                    metrics = (await http.get(running.http + "/metrics")).text
                await ws.send(json.dumps({"type": "end"}))
                events = [json.loads(m) async for m in ws]
                code = ws.close_code
            elapsed = time.monotonic() - started
    assert code == 1000 and events[-1]["type"] == "end"
    want = [(e.text, e.start_time) for e in expected_events(reference.model, reference.outputs(clip)) if isinstance(e, Word)]
    assert [(e["text"], e["start_time"]) for e in events if e["type"] == "word"] == want
    assert elapsed > 1.5 * len(clip) / SAMPLE_RATE  # slowed: transcribed at the engine's pace
    assert status["real_time_factor"] > 1.5 and status["max_backlog_s"] > 1.0
    rtf = [line for line in metrics.splitlines() if line.startswith("kyutai_stt_real_time_factor ")]
    assert rtf and float(rtf[0].split()[1]) > 1.5
    assert any("slower than real time" in r.getMessage() for r in caplog.records)


def test_the_real_time_factor_shares_the_frames_among_the_streams_stepped(caplog):
    """Three streams taking turns in 10-frame lane steps of 170 ms advance each stream by 0.8 s every 0.51 s: a
    factor of 0.64, no warning (counting steps of ``frames_per_step`` frames, as before, read 1.06 and warned). Streams
    that just came are no trend yet, and streams joining one that ran alone share only the steps of their time. One
    stream in 2-frame steps of 0.4 s: 2.5, warned once a second of its audio is in. Init steps count their time
    only."""
    fast, slow, joined = RealTimeMonitor(), RealTimeMonitor(), RealTimeMonitor()
    with caplog.at_level(logging.WARNING, logger="kyutai_stt.serve.pace"):
        fast.on_step(0, 0.05, 0)
        for _ in range(6):
            fast.on_step(10, 0.17, 3)
        assert fast.real_time_factor() == pytest.approx((0.05 + 6 * 0.17) / (60 * 0.08 / 3))
        # streams that just came: their init step and first step are slow per frame, but no trend yet
        joined.on_step(0, 0.1, 0)
        joined.on_step(6, 0.1, 3)
        assert joined.real_time_factor() > 1
        # one stream for 4 s at half the real pace, then two more: each step is shared among the streams of its time
        for _ in range(25):
            joined.on_step(2, 0.08, 1)
        for _ in range(5):
            joined.on_step(6, 0.1, 3)
        assert joined.real_time_factor() == pytest.approx((0.2 + 25 * 0.08 + 0.5) / ((2 + 25 * 2 + 5 * 2) * 0.08))
        assert not caplog.records
        for _ in range(7):
            slow.on_step(2, 0.4, 1)
    assert slow.real_time_factor() == pytest.approx(2.5)
    assert [r.getMessage() for r in caplog.records if "slower than real time" in r.getMessage()]


def test_the_streams_are_those_stepped_lately_that_still_hold_their_slot():
    active = ActiveStreams(4)
    assert active.stepped([0, 1, 2]) == 3
    assert active.stepped([0]) == 3  # 1 and 2 stepped within the window
    active.release(1)  # its stream is gone
    assert active.stepped([0]) == 2


async def test_idle_client_gets_the_words_of_its_audio_and_end_before_the_close(checkpoint_dir, reference):
    """A client streams 1.5 s of speech, then sends nothing: at the idle timeout the server finishes the audio it
    received, sends its words and `end`, then closes 1008 with the reason. Also the audio its decoder still held
    (16 kHz PCM: the resampler's last samples; WAV: the container's rest): `end.duration` is all the audio sent."""
    import io

    import soundfile

    from .conftest import CASES

    pcm, rate = soundfile.read(str(CASES / "speech_fr_first1500ms_24k.wav"), dtype="int16")
    assert rate == SAMPLE_RATE
    wav = io.BytesIO()
    soundfile.write(wav, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")

    async def idle_after(running, query: str, data: bytes) -> tuple[list, websockets.ClientConnection]:
        async with websockets.connect(running.ws + "/v1/stream?" + query) as ws:
            for i in range(0, len(data), 2 * FRAME_SIZE):
                await ws.send(data[i:i + 2 * FRAME_SIZE])
            events = []
            with pytest.raises(websockets.ConnectionClosedError):  # closed 1008, after everything was sent
                while True:
                    events.append(json.loads(await ws.recv()))
        assert ws.close_code == 1008 and "no data" in (ws.close_reason or "")
        assert events[-1]["type"] == "end"
        return events, ws

    with start_server(checkpoint_dir, slots=1, idle_timeout_s=1.0) as running:
        events, ws = await idle_after(running, "format=pcm_s16le", pcm.tobytes())
        # the same bytes read as 16 kHz (resampled to 24) and as a WAV file: nothing the decoder held is lost
        resampled, _ = await idle_after(running, "format=pcm_s16le&sample_rate=16000", pcm.tobytes())
        contained, _ = await idle_after(running, "format=wav", wav.getvalue())
    assert events[-1]["duration"] == pytest.approx(len(pcm) / SAMPLE_RATE, abs=1e-3)
    assert resampled[-1]["duration"] == pytest.approx(len(pcm) / 16000, abs=1e-3)
    assert contained[-1]["duration"] == pytest.approx(len(pcm) / SAMPLE_RATE, abs=1e-3)
    assert [e for e in contained if e["type"] == "word"] == [e for e in events if e["type"] == "word"]
    audio = pcm.astype(np.float32) / 32768
    want = pair_words(e for e in expected_events(reference.model, reference.outputs(audio)))
    got = [(e["text"], e["start_time"]) for e in events if e["type"] == "word"]
    assert got == [(w.text, w.start) for w in want] and got


async def test_a_peer_that_stops_sending_and_reading_is_dropped_twice_the_ping_interval_after(checkpoint_dir, caplog):
    """A client that never reads (so never answers a ping) is kept while its audio comes, and dropped (keepalive
    timeout) twice the ping interval after its last data, not later: a dead peer does not hold its slot for long.
    (Before: data after a ping bought a whole new round, up to 5 intervals.)"""
    ping = 1.0
    with start_server(checkpoint_dir, slots=1, ping_interval_s=ping, idle_timeout_s=30) as running:
        with caplog.at_level(logging.INFO, logger="kyutai_stt.serve.protocols.runner"):
            ws = await websockets.connect(running.ws + "/v1/stream?format=pcm_s16le", ping_interval=None)
            ws.transport.pause_reading()  # the server's pings are never read, so never answered
            started = time.monotonic()
            for i in range(40):  # 3.2 s of audio at real pace: several pings go unanswered meanwhile
                await ws.send(bytes(2 * FRAME_SIZE))
                last = time.time()
                await asyncio.sleep(max(0.0, started + (i + 1) * FRAME_SIZE / SAMPLE_RATE - time.monotonic()))
            for _ in range(100):
                await asyncio.sleep(0.1)
                dropped = [r for r in caplog.records if ": keepalive timeout after" in r.getMessage()]
                if dropped:
                    break
            ws.transport.abort()
    assert dropped, "the silent peer was never dropped"
    delay = dropped[0].created - last
    assert 2 * ping - 0.1 <= delay <= 2 * ping + 0.5, delay


async def test_disconnects_are_told_apart_in_logs_and_metrics(checkpoint_dir, caplog):
    """A client that closes, one whose connection stops answering pings, and a server-side close are logged and
    counted differently."""
    with start_server(checkpoint_dir, slots=2, ping_interval_s=0.3, idle_timeout_s=30) as running:
        with caplog.at_level(logging.INFO, logger="kyutai_stt.serve.protocols.runner"):
            async with websockets.connect(running.ws + "/v1/stream?format=pcm_s16le", ping_interval=None) as ws:
                await ws.send(bytes(3840))
            quiet = await websockets.connect(running.ws + "/v1/stream?format=pcm_s16le", ping_interval=None)
            await quiet.send(bytes(3840))
            await asyncio.sleep(0.3)
            quiet.transport.pause_reading()  # the server's pings are never read, so never answered
            for _ in range(100):
                await asyncio.sleep(0.1)
                if any("keepalive timeout" in r.getMessage() for r in caplog.records):
                    break
            quiet.transport.abort()
            for _ in range(300):  # the server logs once it has cleaned up: wait for both (a loaded machine is slow)
                found = [m for m in (r.getMessage() for r in caplog.records) if " after " in m]
                if len(found) >= 2 and any("keepalive" in m for m in found):
                    break
                await asyncio.sleep(0.1)
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(running.http + "/metrics")).text
    messages = [m for m in (r.getMessage() for r in caplog.records) if "s of audio" in m]
    assert len(messages) == 2 and sum(": keepalive timeout after" in m for m in messages) == 1, messages
    assert 'kyutai_stt_errors_total{kind="keepalive_timeout"} 1.0' in metrics
    assert 'kind="client_closed"' not in metrics


async def test_real_time_client_that_reads_only_at_the_end_keeps_its_connection(checkpoint_dir, reference, sounds):
    """A client streams at real pace and reads nothing until it has sent everything. Its `websockets` library stops
    reading the socket once 16 messages wait unread (the Step messages fill that in 1.3 s), so the server's pings go
    unanswered for seconds. The audio that keeps arriving says the client is alive: the server keeps the connection
    (before: closed 1011 "keepalive ping timeout" 2 s after the first unanswered ping, within the 6 s) and the
    client gets every word of the file mode."""
    clip = sounds(6.0, 32)
    with start_server(checkpoint_dir, slots=1, ping_interval_s=1.0) as running:
        async with websockets.connect(running.ws + "/api/asr-streaming", ping_interval=None) as ws:
            started = time.monotonic()
            for i in range(0, len(clip), FRAME_SIZE):
                await ws.send(audio_message(clip[i:i + FRAME_SIZE]))
                await asyncio.sleep(max(0.0, started + (i + FRAME_SIZE) / SAMPLE_RATE - time.monotonic()))
            await ws.send(msgpack.packb({"type": "Marker", "id": 0}))
            for _ in range(3):
                await ws.send(audio_message(np.zeros(SAMPLE_RATE)))
            words: list[tuple[str, float]] = []
            # cut off, this raises ConnectionClosedError (1011); the close after the marker is the client's own (its
            # library may not read the close reply behind the steps it left unread: not what is tested here)
            assert await words_until_marker(ws, words)
    assert words == words_before_marker(reference, np.concatenate([clip, np.zeros(3 * SAMPLE_RATE, np.float32)]))
