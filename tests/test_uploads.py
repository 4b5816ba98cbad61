"""The HTTP upload path (``serve/uploads.py``) under size: a body over the cap is refused with 413 as soon as it is
known to be (before a byte of it is read when its length is declared, at the cap when it is not), and a big
upload within the cap leaves the event loop free, so that a live stream's events keep flowing meanwhile."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import wave

import httpx
import numpy as np
import pytest
import websockets

from kyutai_stt.serve import uploads

from .conftest import start_server

CAP = 64 * 1024 * 1024
DECLARED = 200 * 1024 * 1024  # a WAV header may claim any size: the cap is checked against what is sent


@pytest.fixture(scope="module")
def capped(checkpoint_dir):
    with start_server(checkpoint_dir, slots=2, max_upload_bytes=CAP) as running:
        yield running


def wav_with_junk(pcm: np.ndarray, junk: int) -> bytes:
    """A valid 24 kHz WAV of ``pcm`` carrying a ``junk`` chunk of that many bytes (decoders skip it): a big body
    that holds little audio, so that the upload is big but its transcription short."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes((pcm * 32767).astype("<i2").tobytes())
    data = out.getvalue()
    fmt_end = 12 + 8 + 16  # RIFF header, then the 16-byte fmt chunk
    body = data[12:fmt_end] + b"junk" + struct.pack("<I", junk) + bytes(junk) + data[fmt_end:]
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def wav_header(seconds_claimed: float) -> bytes:
    """The 44-byte header of a 24 kHz 16-bit WAV claiming ``seconds_claimed`` of audio."""
    size = int(seconds_claimed * 48000)
    return (b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000, 2, 16)
            + b"data" + struct.pack("<I", size))


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict]:
    """An HTTP/1.1 response's status and JSON body (uvicorn sends a Content-Length)."""
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, json.loads(await reader.readexactly(length))


def error_message(body: dict) -> str:
    """Kyutai's ``detail``, OpenAI's ``error.message`` or Deepgram's ``err_msg``."""
    return body.get("detail") or body.get("err_msg") or body["error"]["message"]


ENDPOINTS = [("/api/asr-streaming", "audio/wav"), ("/v1/listen", "audio/wav"),
             ("/v1/audio/transcriptions", "multipart/form-data; boundary=cut")]
FORM_START = (b'--cut\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
              b"Content-Type: audio/wav\r\n\r\n")


@pytest.mark.parametrize("path,content_type", ENDPOINTS)
async def test_a_declared_oversized_upload_is_refused_before_its_body(capped, path, content_type):
    """Only the headers and the start of the file are sent: the 413 comes without the server waiting for the
    200 MB declared (it would wait forever if it read the body first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", capped.port)
    start = (FORM_START if path.endswith("transcriptions") else b"") + wav_header(DECLARED / 48000)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {DECLARED}\r\n\r\n".encode() + start)
    await writer.drain()
    try:
        status, body = await asyncio.wait_for(read_response(reader), timeout=30)
    finally:
        writer.close()
    assert status == 413 and f"larger than {CAP} bytes" in error_message(body), body


@pytest.mark.parametrize("path,content_type", ENDPOINTS)
async def test_an_undeclared_oversized_upload_is_cut_off_at_the_cap(capped, path, content_type):
    """A chunked body of no declared length is read up to the cap, then refused and the connection closed: the
    client, which has 4 times the cap to send, is answered long before it has sent it all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", capped.port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    block = bytes(1024 * 1024)
    sent = 0

    async def send() -> None:
        nonlocal sent
        first = FORM_START if path.endswith("transcriptions") else wav_header(4 * CAP / 48000)
        for chunk in [first] + [block] * (4 * CAP // len(block)):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            sent += len(chunk)
            await asyncio.sleep(0)  # drain() need not yield: let the reader see the answer as soon as it comes

    sender = asyncio.create_task(send())
    try:
        status, body = await asyncio.wait_for(read_response(reader), timeout=60)
        sent_when_answered = sent
        try:  # the server closed the connection: an end of file, or a reset (it closed with our bytes unread)
            closed = await asyncio.wait_for(reader.read(), timeout=30) == b""
        except ConnectionResetError:
            closed = True
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    assert status == 413 and f"larger than {CAP} bytes" in error_message(body), body
    assert CAP <= sent_when_answered < 2 * CAP, sent_when_answered
    assert closed


async def test_a_big_upload_leaves_the_event_loop_free(capped, sounds, monkeypatch):
    """While a 48 MB upload is received and decoded (the decoding made 3 s slower here, blocking whatever thread
    runs it), a live stream keeps receiving its step events and ``/status`` keeps answering at once. Decoding on
    the event loop, or copying the body over and over as it arrives, stalls both."""
    decoding: list[float] = []
    real_decoder = uploads.load_audio_file

    def slow_decoder(*args, **kwargs):
        decoding.append(time.monotonic())
        time.sleep(3.0)  # a long file's decoding, without needing a long file
        try:
            return real_decoder(*args, **kwargs)
        finally:
            decoding.append(time.monotonic())

    monkeypatch.setattr(uploads, "load_audio_file", slow_decoder)
    body = wav_with_junk(sounds(1.0, 7), 48 * 1024 * 1024)
    live = sounds(1.0, 8).astype("<f4")
    steps: list[float] = []
    latencies: list[float] = []
    uploaded = asyncio.Event()

    async with websockets.connect(capped.ws + "/v1/stream?format=pcm_f32le&steps=true") as ws:
        assert json.loads(await ws.recv())["type"] == "ready"

        async def speak() -> None:  # 80 ms of audio every 80 ms, as a microphone would
            while not uploaded.is_set():
                for i in range(0, len(live), 1920):
                    await ws.send(live[i:i + 1920].tobytes())
                    await asyncio.sleep(0.08)

        async def listen() -> None:
            async for message in ws:
                if json.loads(message)["type"] == "step":
                    steps.append(time.monotonic())

        async def poll(client: httpx.AsyncClient) -> None:
            while not uploaded.is_set():
                start = time.monotonic()
                assert (await client.get(capped.http + "/status")).status_code == 200
                latencies.append(time.monotonic() - start)
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(speak()), asyncio.create_task(listen())]
        async with httpx.AsyncClient(timeout=120) as client:
            poller = asyncio.create_task(poll(client))
            await asyncio.sleep(1.0)  # the stream is under way
            response = await client.post(capped.http + "/api/asr-streaming", content=body)
            uploaded.set()
            await poller
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    assert response.status_code == 200, response.text
    assert len(decoding) == 2, "the upload was not decoded through uploads.load_audio_file"
    during = [t for t in steps if decoding[0] <= t <= decoding[1]]
    gaps = np.diff([decoding[0], *during, decoding[1]])
    assert gaps.max() < 1.5, f"the live stream got no event for {gaps.max():.1f} s while the upload was decoded"
    assert max(latencies) < 1.5, f"/status took {max(latencies):.1f} s during the upload"
