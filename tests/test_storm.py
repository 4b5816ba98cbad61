"""Reconnect storm: 1000 connections that vanish in every way a client can vanish, against one server.

Clients drop with a TCP reset (SO_LINGER 0, no close frame) right after the upgrade, before reading the 101, in
the middle of the HTTP request, or mid-stream after sending audio; others close the TCP connection without a close
frame, or close properly mid-stream. Some find every slot taken (1013). Afterwards the server is back to where it
started: no slot in use, no open connection, no extra thread or file descriptor, bounded memory, and a normal stream
still gets exactly its reference words.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import threading
import time

import msgpack
import numpy as np
import pytest
import websockets

from kyutai_stt.audio.decode import encode_ogg_opus
from kyutai_stt.client import Client

from .hardening import ref_words, wait_idle, words_of

CONNECTIONS = int(os.environ.get("KYUTAI_STT_STORM_CONNECTIONS", "1000"))
CONCURRENCY = 6  # under the 8 slots of the `server` fixture
PATHS = ("/ws", "/v1/stream?format=pcm_f32le", "/api/asr-streaming")
BEHAVIOURS = ("reset_after_open", "reset_mid_stream", "reset_before_101", "reset_after_101", "reset_mid_request",
              "fin_mid_stream", "close_mid_stream")
RSS_GROWTH_LIMIT = 100 * 2**20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def reset(transport: asyncio.Transport) -> None:
    """Drop the connection with a TCP RST: linger 0, then close at once (no close frame, no FIN)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.is_closing():
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:  # the server closed it first (a refusal)
            pass
    transport.abort()


def audio_message(path: str, rng: random.Random, pages: list[bytes], index: int) -> bytes:
    if path == "/ws":
        return pages[index % len(pages)] if index else pages[0]
    pcm = np.asarray([rng.uniform(-0.3, 0.3) for _ in range(1920)], np.float32)
    if path.startswith("/v1/stream"):
        return pcm.astype("<f4").tobytes()
    return msgpack.packb({"type": "Audio", "pcm": pcm.tolist()}, use_single_float=True)


def upgrade_request(port: int, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


async def one_client(server, number: int, pages: list[bytes]) -> str:
    rng = random.Random(number)
    path = PATHS[number % len(PATHS)]
    behaviour = BEHAVIOURS[(number // len(PATHS)) % len(BEHAVIOURS)]
    if behaviour.startswith("reset_") and behaviour in ("reset_before_101", "reset_after_101", "reset_mid_request"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = upgrade_request(server.port, path)
        if behaviour == "reset_mid_request":
            writer.write(request[: rng.randrange(1, len(request) - 4)])
            await writer.drain()
        else:
            writer.write(request)
            await writer.drain()
            if behaviour == "reset_after_101":
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        reset(writer.transport)
        return behaviour
    ws = await websockets.connect(server.ws + path, max_size=None, open_timeout=30, close_timeout=1)
    try:
        if path != "/ws":  # the others greet first (Ready, or an Error when every slot is taken)
            greeting = await asyncio.wait_for(ws.recv(), 30)
            if b"Error" in greeting.encode() if isinstance(greeting, str) else b"Error" in greeting:
                return "refused"
        if behaviour != "reset_after_open":
            for index in range(rng.randrange(1, 6)):
                await ws.send(audio_message(path, rng, pages, index))
            await asyncio.sleep(rng.uniform(0, 0.3))  # the engine is working on the stream when it goes
        if behaviour == "close_mid_stream":
            await ws.close()
        elif behaviour == "fin_mid_stream":
            ws.transport.close()  # FIN without a close frame
        else:
            reset(ws.transport)
    except websockets.ConnectionClosed:  # refused: every slot was taken
        return "refused"
    finally:
        ws.transport.abort()
    return behaviour


async def storm(server, count: int) -> dict[str, int]:
    pages = encode_ogg_opus(np.sin(np.arange(24000) / 10).astype(np.float32) * 0.3)
    queue = iter(range(count))
    done: dict[str, int] = {}

    async def worker():
        for number in queue:
            behaviour = await one_client(server, number, pages)
            done[behaviour] = done.get(behaviour, 0) + 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done


async def settled(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@pytest.mark.slow  # long audio or many connections: `uv run pytest -m slow` (CI runs it)
async def test_reconnect_storm(server, reference, sounds):
    connections = server.server.server_state.connections  # uvicorn's live connections
    await storm(server, 2 * len(PATHS) * len(BEHAVIOURS))  # warm up every code path once
    await wait_idle(server)
    assert await settled(lambda: not connections)
    threads, fds, memory = threading.active_count(), open_fds(), rss()

    started = time.monotonic()
    done = await storm(server, CONNECTIONS)
    elapsed = time.monotonic() - started
    assert sum(done.values()) == CONNECTIONS and set(done) - {"refused"} == set(BEHAVIOURS)
    # fewer clients at a time than slots: a refusal means a slot outlived its client (a little slack for the race
    # between a client's reset and the next connect)
    assert done.get("refused", 0) < CONNECTIONS / 10, done

    await wait_idle(server, timeout=60)
    assert await settled(lambda: not connections), f"{len(connections)} connections left open on the server"
    assert await settled(lambda: threading.active_count() <= threads), (threading.active_count(), threads)
    assert await settled(lambda: open_fds() <= fds + 2), (open_fds(), fds)
    growth = rss() - memory
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.0f} MiB"
    status = await wait_idle(server)
    print(f"\n{CONNECTIONS} connections in {elapsed:.1f} s ({done}); RSS {growth / 2**20:+.1f} MiB; {status}")

    pcm = sounds(1.2, 121)
    events = [event async for event in Client(server.ws).stream(pcm)]
    assert words_of(events) == ref_words(reference, pcm)
