"""Failure behaviour of the real server: overload, engine faults, stuck readers, shutdown, CORS, logs, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import websockets

from kyutai_stt.messages.events import Word
from kyutai_stt.serve.logs import JsonFormatter
from kyutai_stt.stream.session import Session

from .conftest import FLUSH_SECONDS, free_port, start_server
from .helpers import expected_events
from .test_protocols import ref_words, words_of, wav_bytes
from kyutai_stt.client import Client

KEY = "hardening-key"
ALLOWED = "http://allowed.example"


@pytest.fixture(scope="module")
def busy(checkpoint_dir):
    """2 slots, a waiting queue of 1, HTTP requests refused at once when full, CORS for one origin, a key."""
    with start_server(checkpoint_dir, slots=2, queue_max=1, queue_timeout_s=60, http_slot_wait_s=0,
                      cors_origins=[ALLOWED], api_keys=[KEY]) as running:
        yield running


def events_url(server, **query) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"api_key": KEY, "format": "pcm_f32le", **query}.items())
    return f"{server.ws}/v1/stream?{params}"


async def test_overload_queue_then_refuse(busy, reference, sounds):
    pcm = sounds(1.0, 81)
    async with websockets.connect(events_url(busy)) as a, websockets.connect(events_url(busy)) as b:
        assert json.loads(await a.recv())["type"] == "ready" and json.loads(await b.recv())["type"] == "ready"
        # the third client waits in the queue (no answer yet); the fourth finds the queue full: 1013 at once
        async with websockets.connect(events_url(busy)) as c:
            waiting = asyncio.create_task(c.recv())
            await asyncio.sleep(0.5)
            assert not waiting.done()
            async with websockets.connect(events_url(busy)) as d:
                error = json.loads(await d.recv())
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await d.recv()
            assert error["type"] == "error" and closed.value.rcvd.code == 1013
            async with httpx.AsyncClient(timeout=60) as client:
                response = await client.post(busy.http + "/v1/audio/transcriptions", headers={"Authorization": "Bearer " + KEY},
                                             files={"file": ("a.wav", wav_bytes(pcm))}, data={"model": "x"})
            assert response.status_code == 503 and response.headers["retry-after"] == "5"
            # a finishes: the queued client gets its slot and a normal, exact transcription
            await a.send(json.dumps({"type": "end"}))
            await b.send(json.dumps({"type": "end"}))
            assert [json.loads(m)["type"] async for m in a][-1] == "end"
            assert [json.loads(m)["type"] async for m in b][-1] == "end"
            assert json.loads(await waiting)["type"] == "ready"
            await c.send(pcm.tobytes())
            await c.send(json.dumps({"type": "end"}))
            events = [json.loads(m) async for m in c]
        assert [(e["text"], e["start_time"]) for e in events if e["type"] == "word"] == [
            (e.text, e.start_time) for e in expected_events(reference.model, reference.outputs(pcm)) if isinstance(e, Word)]


async def test_cors_and_websocket_origins(busy):
    async with httpx.AsyncClient() as client:
        preflight = await client.options(busy.http + "/v1/audio/transcriptions", headers={
            "Origin": ALLOWED, "Access-Control-Request-Method": "POST"})
        assert preflight.headers.get("access-control-allow-origin") == ALLOWED
        other = await client.options(busy.http + "/v1/audio/transcriptions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    with pytest.raises(websockets.InvalidStatus) as denied:
        async with websockets.connect(events_url(busy), origin="http://evil.example"):
            pass
    assert denied.value.response.status_code == 403
    async with websockets.connect(events_url(busy), origin=ALLOWED) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"


async def test_no_key_and_no_audio_in_logs(busy, caplog, sounds):
    caplog.set_level(logging.DEBUG)
    async with httpx.AsyncClient() as client:
        await client.get(f"{busy.http}/v1/models?api_key={KEY}")
    async with websockets.connect(events_url(busy)) as ws:
        await ws.recv()
        await ws.send(sounds(0.3, 1).tobytes())
        await ws.send(json.dumps({"type": "end"}))
        async for _ in ws:
            pass
    await asyncio.sleep(0.2)
    # the server's own logs (the test's HTTP client logs its URLs itself, key included: not ours)
    server_lines = [r.getMessage() for r in caplog.records if r.name.startswith(("kyutai_stt", "uvicorn"))]
    text = "\n".join(server_lines)
    assert "GET /v1/models 200" in text and "session" in text
    assert KEY not in text


def test_json_logs_carry_the_session_id():
    record = logging.LogRecord("kyutai_stt.stream.session", logging.INFO, __file__, 1, "session %s: closed", ("abc",), None)
    record.session_id = "abc"
    line = json.loads(JsonFormatter().format(record))
    assert line["session_id"] == "abc" and line["message"] == "session abc: closed" and line["level"] == "info"


async def test_metrics(busy, sounds):
    async with websockets.connect(events_url(busy)) as ws:
        await ws.recv()
        await ws.send(sounds(0.5, 2).tobytes())
        await ws.send(json.dumps({"type": "end"}))
        async for _ in ws:
            pass
    async with websockets.connect(events_url(busy, format="opus")) as ws:
        await ws.recv()
        await ws.send(b"not ogg")
        with pytest.raises(websockets.ConnectionClosedError):
            async for _ in ws:
                pass
    async with httpx.AsyncClient() as client:
        body = (await client.get(busy.http + "/metrics")).text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line and not line.startswith("#")}
    assert values["kyutai_stt_slots_total"] == 2
    assert values["kyutai_stt_frames_processed_total"] > 0
    assert values["kyutai_stt_step_duration_seconds_count"] > 0
    assert values['kyutai_stt_sessions_total{protocol="events"}'] >= 2
    assert values['kyutai_stt_errors_total{kind="invalid_data"}'] >= 1
    assert values["kyutai_stt_engine_healthy"] == 1


async def test_engine_fault_fails_its_streams_and_recovers(server, reference, sounds):
    pcm = sounds(1.2, 91)
    fired = []

    def fail_once():
        if not fired and server.engine.stats().slots_in_use:
            fired.append(True)
            raise RuntimeError("injected fault")

    server.engine.fault_injector = fail_once
    try:
        with pytest.raises(Exception) as failed:
            [e async for e in Client(server.ws).stream(pcm)]
        assert "internal error" in str(failed.value)
    finally:
        server.engine.fault_injector = None
    assert fired
    # fresh slots: the next stream is exact again, and nothing is stuck
    assert words_of([e async for e in Client(server.ws).stream(pcm)]) == ref_words(reference, pcm)
    async with httpx.AsyncClient() as client:
        status = (await client.get(server.http + "/status")).json()
    assert status["healthy"] and status["slots_in_use"] == 0 and status["step_failures"] >= 1


async def test_dead_worker_is_reported_unhealthy(checkpoint_dir, sounds):
    class WorkerKilled(BaseException):
        pass

    def kill():
        raise WorkerKilled()

    with start_server(checkpoint_dir, slots=1) as doomed:
        doomed.engine.fault_injector = kill
        with pytest.raises(Exception):
            [e async for e in Client(doomed.ws).stream(sounds(0.3, 3))]
        for _ in range(50):
            if not doomed.engine.alive:
                break
            await asyncio.sleep(0.1)
        async with httpx.AsyncClient() as client:
            response = await client.get(doomed.http + "/status")
        assert response.status_code == 503 and response.json()["healthy"] is False
        async with websockets.connect(doomed.ws + "/v1/stream") as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd.code == 1011


async def test_stuck_reader_is_dropped_without_blocking_the_engine(server, sounds):
    session = Session(server.engine, max_pending_events=20)
    session.start()
    session.push_pcm(sounds(3.0, 4))  # ~45 steps of events; nobody reads them
    session.end()
    for _ in range(400):
        if session.dropped.is_set():
            break
        await asyncio.sleep(0.05)
    assert session.dropped.is_set() and session.finished
    assert server.engine.stats().slots_in_use == 0


def test_sigterm_flushes_active_streams(checkpoint_dir, reference, sounds, tmp_path):
    port = free_port()
    env = dict(os.environ, KYUTAI_STT_FLUSH_SECONDS=str(FLUSH_SECONDS), KYUTAI_STT_SHUTDOWN_FLUSH_S="60")
    proc = subprocess.Popen([sys.executable, "-m", "kyutai_stt.cli", "serve", "--model", str(checkpoint_dir),
                             "--device", "cpu", "--dtype", "float32", "--port", str(port), "--slots", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/status").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        pcm = sounds(1.5, 92)

        async def stream():
            async with websockets.connect(f"ws://127.0.0.1:{port}/v1/stream?format=pcm_f32le") as ws:
                await ws.recv()
                await ws.send(pcm.tobytes())  # and no end: the shutdown ends it
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                started = time.monotonic()
                events = [json.loads(m) async for m in ws]
                return events, ws.close_code, time.monotonic() - started

        events, code, seconds = asyncio.run(stream())
        assert code == 1000 and events[-1]["type"] == "end" and seconds < 60
        want = [(e.text, e.start_time) for e in expected_events(reference.model, reference.outputs(pcm)) if isinstance(e, Word)]
        assert [(e["text"], e["start_time"]) for e in events if e["type"] == "word"] == want
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in output, output


@pytest.mark.parametrize("protocol", ["events", "kyutai"])
async def test_fast_sender_is_read_at_once_and_transcribed_at_engine_pace(checkpoint_dir, reference, sounds, protocol):
    """A client sending far faster than real time is read at once: the engine holds ``max_buffered_audio_s`` of
    its audio, the rest waits in the session's spool (reported in Step.buffered_samples), and its words are
    unchanged."""
    from kyutai_stt.messages.events import Step

    clip = sounds(6.0, 21)
    limit_s = 0.5
    with start_server(checkpoint_dir, slots=2, max_buffered_audio_s=limit_s) as running:
        events = [e async for e in Client(running.ws, protocol=protocol).stream(clip, steps=True)]
        for _ in range(1200):
            if running.engine.stats().slots_in_use == 0:
                break
            await asyncio.sleep(0.05)
        assert running.engine.stats().slots_in_use == 0
    waiting = max(e.buffered_samples for e in events if isinstance(e, Step))
    assert waiting > 2 * limit_s * 24000  # the client was read ahead of the engine: its audio waited in the spool
    assert words_of(events) == ref_words(reference, clip)
