"""EngineClient over real ZeroMQ ipc:// sockets to an EngineServer serving a real Engine (in threads of this
process: the multi-process tree is tested in test_workers.py). Tokens equal the single-stream reference; slots are
allocated by the engine only; a worker reported gone has its slots freed at once."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kyutai_stt.audio.constants import FRAME_SIZE
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.engine import Engine, NoFreeSlot, StepOutput, StreamClosed, StreamEnd
from kyutai_stt.engine import contract
from kyutai_stt.engine.ipc import EngineClient, EngineServer, Endpoints, tell_engine_worker_gone

from .conftest import FLUSH_SECONDS


@pytest.fixture(scope="module")
def served(checkpoint_dir, tmp_path_factory):
    model = load_model(str(checkpoint_dir), "cpu", "float32")
    engine = Engine(model, 2, flush_seconds=FLUSH_SECONDS, frames_per_step=2, lane_slots=1).start()
    endpoints = Endpoints.in_folder(str(tmp_path_factory.mktemp("ipc")))
    server = EngineServer(engine, endpoints)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = EngineClient(endpoints, "worker-test.1", connect_timeout=30)
    yield engine, endpoints, client
    client.stop()
    server.stop()
    thread.join(10)
    engine.stop()


def collect():
    events, done = [], threading.Event()

    def sink(batch):
        events.extend(batch)
        if any(not isinstance(e, StepOutput) for e in batch):
            done.set()
    return events, done, sink


def test_tokens_exact_through_the_client(served, reference, sounds):
    engine, _, client = served
    assert client.batch_size == 2 and client.info.delay_frames == engine.model.delay_frames
    assert client.info.piece(5) == engine.model.tokenizer.id_to_piece(5)
    assert client.info == engine.info  # the whole model description crosses the handshake
    assert isinstance(engine, contract.Engine) and isinstance(client, contract.Engine)
    pcm = sounds(1.5, 3)
    events, done, sink = collect()
    handle = client.open(sink)
    for start in range(0, pcm.size, 1000):  # odd chunks, several per frame
        client.push(handle, pcm[start:start + 1000])
    assert client.buffered_samples(handle) > 0
    client.close(handle)
    with pytest.raises(StreamClosed):
        client.push(handle, pcm[:10])
    assert done.wait(120)
    assert isinstance(events[-1], StreamEnd)
    assert [e.token for e in events if isinstance(e, StepOutput)] == reference.tokens(pcm)
    assert client.buffered_samples(handle) == 0
    assert client.stats().slots_in_use == 0


def test_a_close_without_flush_through_the_client(served, reference, sounds):
    """``close(flush=False)`` (the end right after a finalize's flush): the stream's own frames only, the
    reference's tokens for them, then ``StreamEnd``; with nothing left to step at all (no audio), ``StreamEnd`` at
    once (no step would deliver it)."""
    engine, _, client = served
    pcm = sounds(1.0, 6)[:6 * FRAME_SIZE]
    events, done, sink = collect()
    handle = client.open(sink)
    client.push(handle, pcm)
    client.close(handle, flush=False)
    assert done.wait(120) and isinstance(events[-1], StreamEnd) and events[-1].frames == 6
    assert [e.token for e in events if isinstance(e, StepOutput)] == reference.tokens(pcm)[:6]
    events, done, sink = collect()
    handle = client.open(sink)
    client.close(handle, flush=False)
    assert done.wait(120) and events == [StreamEnd(0)]
    assert client.stats().slots_in_use == 0


def test_a_lone_stream_steps_in_the_lane_exactly(served, reference, sounds):
    """Through the wire, a stream alone on a lane engine is stepped in the lane's small batch (but for its first
    step, a reset, and its padded last one) and gets exactly the reference's tokens."""
    engine, _, client = served
    pcm = sounds(2.0, 5)[:16 * 1920]  # 16 frames: whole steps
    events, done, sink = collect()
    handle = client.open(sink)
    lane_steps = engine.lane_steps
    client.push(handle, pcm)
    client.close(handle)
    assert done.wait(120)
    assert engine.lane_steps > lane_steps
    assert [e.token for e in events if isinstance(e, StepOutput)] == reference.tokens(pcm, mimi_frames_per_call=2)


def test_step_timings_reach_the_clients_listeners(served, sounds):
    """The worker's step listeners (its real-time monitor) get every step's (frames, seconds, streams), as the engine's
    own listeners do, by the time the stream's last events arrive."""
    engine, _, client = served
    in_engine, in_client = [], []
    engine.add_step_listener(lambda *step: in_engine.append(step))
    client.add_step_listener(lambda *step: in_client.append(step))
    events, done, sink = collect()
    handle = client.open(sink)
    client.push(handle, sounds(0.8, 4))
    client.close(handle)
    assert done.wait(120) and isinstance(events[-1], StreamEnd)
    # (the stream's first step, its init, has 0 frames); a step with frames stepped at least this stream
    assert sum(frames for frames, _, _ in in_engine) > 0
    assert all(streams >= 1 for frames, _, streams in in_engine if frames)
    assert in_client == in_engine


def test_admission_by_the_engine_and_a_gone_worker_frees_its_slots(served):
    engine, endpoints, client = served
    handles = [client.open(lambda events: None) for _ in range(2)]
    with pytest.raises(NoFreeSlot):
        client.open(lambda events: None)
    client.abort(handles.pop())
    deadline = time.monotonic() + 10
    while True:  # the abort is queued: the slot is free once the engine process handled it
        try:
            handles.append(client.open(lambda events: None))
            break
        except NoFreeSlot:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    client.push(handles[0], np.zeros(FRAME_SIZE, np.float32))
    assert client.stats().slots_in_use == 2
    tell_engine_worker_gone(endpoints, client.worker_id)  # what the launcher says when it died
    deadline = time.monotonic() + 5
    while engine.stats().slots_in_use:
        assert time.monotonic() < deadline, "the gone worker's slots were not freed"
        time.sleep(0.02)
    # the worker (still alive here) is told its streams were dropped when it feeds them again
    events, done, sink = collect()
    client._streams[(handles[0].slot, handles[0].stream_id)].sink = sink
    client.push(handles[0], np.zeros(FRAME_SIZE, np.float32))
    assert done.wait(10) and events[-1].reason == "the stream was dropped"


def test_the_contract_and_the_wire_need_no_torch():
    """A worker reads the model from its ModelInfo: the contract, the IPC and the words path import no torch."""
    import subprocess
    import sys

    code = ("import sys, kyutai_stt.engine.contract, kyutai_stt.engine.ipc, kyutai_stt.stream.words; "
            "print(sorted(m for m in ('torch', 'moshi', 'sentencepiece') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_finalize_expedite_crosses_the_wire(served, sounds, monkeypatch):
    """``expedite`` (a finalize's client waiting for its words) reaches the engine for the right stream and frame."""
    engine, _, client = served
    calls, expedite = [], engine.expedite

    def seen(handle, frame):
        calls.append((handle.slot, handle.stream_id, frame))
        expedite(handle, frame)
    monkeypatch.setattr(engine, "expedite", seen)
    events, done, sink = collect()
    handle = client.open(sink)
    client.push(handle, np.zeros(30 * FRAME_SIZE, np.float32))
    client.expedite(handle, 17)
    client.close(handle)
    assert done.wait(120) and isinstance(events[-1], StreamEnd)
    assert calls == [(handle.slot, handle.stream_id, 17)]
