"""The server over real sockets: the Modal example's protocol at /ws, /status, full slots, bad bytes."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
import websockets

from .conftest import start_server
from .helpers import expected_pieces, opus_pages_and_decoded, seed_client


async def test_seed_protocol_many_streams_match_reference(server, reference, sounds):
    # 10 streams through 8 slots would be refused; 8 concurrent streams of different lengths, random byte
    # grouping, pauses and start times all fit and must each equal the single-stream reference.
    clips = [sounds(seconds, 100 + i) for i, seconds in enumerate([0.4, 1.6, 0.9, 2.2, 1.2, 0.6, 1.9, 1.0])]
    prepared = [opus_pages_and_decoded(clip) for clip in clips]
    rng = random.Random(0)
    results = await asyncio.gather(*(
        seed_client(server.ws, pages, random.Random(i), start_delay=rng.uniform(0, 1.0))
        for i, (pages, _) in enumerate(prepared)))
    for (pieces, finished, code), (_, decoded) in zip(results, prepared):
        assert finished and code == 1000
        assert pieces == expected_pieces(reference.model, reference.outputs(decoded))


async def test_status_reports_model_and_slots(server):
    async with httpx.AsyncClient() as client:
        status = (await client.get(server.http + "/status")).json()
    assert status["slots_total"] == 8 and status["slots_in_use"] == 0
    assert status["device"] == "cpu" and status["dtype"] == "float32" and status["healthy"] is True
    assert status["random_weights"] is True
    async with websockets.connect(server.ws + "/ws") as ws:
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient() as client:
            assert (await client.get(server.http + "/status")).json()["slots_in_use"] == 1
        await ws.send(b"")
        async for _ in ws:
            pass


async def test_garbage_gets_1007_and_neighbour_is_unchanged(server, reference, sounds):
    pages, decoded = opus_pages_and_decoded(sounds(1.5, 7))

    async def garbage():
        await asyncio.sleep(0.3)
        async with websockets.connect(server.ws + "/ws") as ws:
            await ws.send(b"\x00\x01 definitely not an ogg page")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        return closed.value.rcvd.code, closed.value.rcvd.reason

    (pieces, finished, code), (bad_code, bad_reason) = await asyncio.gather(
        seed_client(server.ws, pages, random.Random(1)), garbage())
    assert bad_code == 1007 and "Ogg" in bad_reason
    assert finished and code == 1000
    assert pieces == expected_pieces(reference.model, reference.outputs(decoded))


async def test_text_frame_on_seed_socket_is_refused(server):
    async with websockets.connect(server.ws + "/ws") as ws:
        await ws.send("hello")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd.code == 1003


async def test_full_slots_close_with_1013(checkpoint_dir, sounds):
    with start_server(checkpoint_dir, slots=1) as small:
        async with websockets.connect(small.ws + "/ws") as first:
            async with websockets.connect(small.ws + "/ws") as second:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await second.recv()
            assert closed.value.rcvd.code == 1013 and "full" in closed.value.rcvd.reason
            await first.send(b"")
            assert [m async for m in first][-1] == b"\x00"
        # the slot is free again
        async with websockets.connect(small.ws + "/ws") as third:
            await third.send(b"")
            assert [m async for m in third][-1] == b"\x00"
