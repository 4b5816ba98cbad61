"""`kyutai-stt serve --workers 2`: one engine process, two front-end worker processes on one port, as real processes
on real sockets. Words through it equal the single-stream reference; admission is global; /metrics and /status
cover the whole server; a killed worker loses only its own streams and its slots are free at once; SIGTERM
flushes every worker's streams; a dead engine makes /status 503 everywhere.

Two servers start at once (their start-up is the slow part); the tests reuse them, destructive ones last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from kyutai_stt.messages.events import Word, WordEnd
from kyutai_stt.client import parse_event
from kyutai_stt.stream.words import pair_words

from .conftest import FLUSH_SECONDS, free_port
from .helpers import expected_words, opus_pages_and_decoded

# multi-process servers, ~3 min: outside the default run (`uv run pytest -m slow`; CI runs it too); the timeout: two
# multi-process servers start on a busy 2-core machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SLOTS = 4
ROOT = Path(__file__).resolve().parents[1]


class Launcher:
    """A `kyutai-stt serve --workers 2` process tree."""

    def __init__(self, checkpoint_dir, log_path: Path, slots: int = SLOTS):
        self.log_path = log_path
        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        env = dict(os.environ, KYUTAI_STT_FLUSH_SECONDS=str(FLUSH_SECONDS), KYUTAI_STT_SHUTDOWN_FLUSH_S="30",
                   KYUTAI_STT_IDLE_TIMEOUT_S="600")  # a busy machine may leave an opened stream idle a while
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        # the log goes to a file: a pipe nobody reads would block every process of the server once full
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kyutai_stt.cli", "serve", "--model", str(checkpoint_dir), "--device", "cpu",
                 "--dtype", "float32", "--slots", str(slots), "--workers", "2", "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            if "kyutai-stt: open" in self.log():  # the URL is printed once the server answers (README), not before
                assert httpx.get(self.http + "/status", timeout=10).status_code == 200
                return
            roles = self.roles()
            if len([r for r in roles if r.startswith("worker-")]) == 2:
                try:
                    if httpx.get(self.http + "/status", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        raise RuntimeError("the multi-worker server did not start")

    def roles(self) -> dict[str, int]:
        """KYUTAI_STT_PROCESS_ROLE -> pid, for the launcher's live children."""
        out = {}
        for task in Path(f"/proc/{self.process.pid}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for pid in map(int, children):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                for item in environ:
                    if item.startswith(b"KYUTAI_STT_PROCESS_ROLE="):
                        out[item.split(b"=", 1)[1].decode()] = pid
        return out

    def worker_of(self, ws) -> int | None:
        """The pid of the worker process holding this client connection's server side (/proc/net/tcp); None
        when the server has closed it already."""
        client_port = ws.local_address[1]
        inode = None
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == self.port and int(remote.split(":")[1], 16) == client_port:
                inode = fields[9]
        if inode in (None, "0"):  # closed on the server's side (TIME_WAIT)
            return None
        for role, pid in self.roles().items():
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    if os.readlink(fd) == f"socket:[{inode}]":
                        return pid
                except OSError:
                    continue
        return None  # closed by its worker since /proc/net/tcp was read

    def status(self) -> httpx.Response:
        return httpx.get(self.http + "/status", timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                for pid in self.roles().values():
                    os.kill(pid, signal.SIGKILL)
                self.process.kill()
        return self.process.wait()


@pytest.fixture(scope="module")
def launchers(checkpoint_dir, tmp_path_factory):
    """Two servers, started together: every test shares the first (the SIGTERM test, which stops it, runs last);
    the second is for the dead-engine test, which leaves its server without an engine."""
    folder = tmp_path_factory.mktemp("launchers")
    servers = [Launcher(checkpoint_dir, folder / "first.log"), Launcher(checkpoint_dir, folder / "second.log")]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def launcher(launchers) -> Launcher:
    return launchers[0]


class Stream:
    """One /v1/stream client (raw websockets): opened, fed, ended, its events collected."""

    opened = 0  # streams given a slot by any server of this module

    def __init__(self, ws):
        Stream.opened += 1
        self.ws = ws
        self.events = []

    @classmethod
    async def open(cls, url: str, query: str = "") -> "Stream | int":
        """The stream once it holds a slot, or the close code when refused."""
        ws = await websockets.connect(url + "/v1/stream" + query, max_size=None)
        first = json.loads(await ws.recv())
        if first["type"] != "ready":
            await ws.wait_closed()
            return ws.close_code
        return cls(ws)

    async def send(self, payloads, pace: float = 0.0) -> None:
        for payload in payloads:
            await self.ws.send(payload)
            if pace:
                await asyncio.sleep(pace)

    async def finish(self) -> int:
        """Send the end of audio and read every event until the server closes; returns the close code."""
        await self.ws.send(json.dumps({"type": "end"}))
        return await self.read_all()

    async def read_all(self) -> int:
        try:
            async for message in self.ws:
                self.events.append(parse_event(message))
        except websockets.ConnectionClosed:
            pass
        return self.ws.close_code

    async def read_until_step(self, step_idx: int) -> None:
        while True:
            event = parse_event(await self.ws.recv())
            self.events.append(event)
            if event.type == "step" and event.step_idx >= step_idx:
                return

    async def read_until_received(self, samples: int) -> None:
        """Read events until a step shows ``samples`` (silence prefix included) stepped or buffered."""
        while True:
            event = parse_event(await self.ws.recv())
            self.events.append(event)
            if event.type == "step" and (event.step_idx + 1) * 1920 + event.buffered_samples >= samples:
                return

    def words(self):
        return pair_words(e for e in self.events if isinstance(e, (Word, WordEnd)))


def exact(reference, stream: Stream, decoded: np.ndarray) -> bool:
    return stream.words() == expected_words(reference.model, reference.outputs(decoded))


async def spread_streams(launcher: Launcher, count: int, query: str = "") -> list[Stream]:
    """``count`` streams with at least one on each worker (connections go to whichever worker accepts first)."""
    streams = []
    for _ in range(30):
        while len(streams) < count:
            opened = await Stream.open(launcher.ws, query)
            assert isinstance(opened, Stream), opened
            streams.append(opened)
        pids = [launcher.worker_of(s.ws) for s in streams]
        assert None not in pids
        if len(set(pids)) == 2:
            return streams
        await streams.pop().ws.close()
        await asyncio.sleep(0.2)
    raise AssertionError("every connection went to the same worker")


async def test_words_exact_and_admission_global(launcher, reference, sounds):
    clips = [sounds(1.2 + 0.2 * i, 40 + i) for i in range(SLOTS)]
    encoded = [opus_pages_and_decoded(c) for c in clips]
    before = _metric(launcher, 'kyutai_stt_sessions_total{protocol="events"}')
    opened_before = Stream.opened
    streams = await spread_streams(launcher, SLOTS)
    sessions = Stream.opened - opened_before  # spread_streams may open more and close them
    assert launcher.status().json()["slots_in_use"] == SLOTS
    for _ in range(4):  # whichever worker takes it, every slot is held by someone: 1013
        assert await Stream.open(launcher.ws) == 1013
    live = asyncio.Event()
    factors = asyncio.create_task(_real_time_factors(launcher, live))
    codes = await asyncio.gather(*[s.send(pages, pace=0.01) for s, (pages, _) in zip(streams, encoded)])
    codes = await asyncio.gather(*[s.finish() for s in streams])
    live.set()
    assert codes == [1000] * SLOTS
    # the engine process's step timings reach the workers' real-time monitors (0 without them)
    from_status, from_metrics = await factors
    assert max(from_status) > 0 and max(from_metrics) > 0
    for stream, (_, decoded) in zip(streams, encoded):
        assert stream.words(), "random weights still give words for these clips"
        assert exact(reference, stream, decoded)
    # metrics: whichever worker answers, the sums cover both workers and the engine process
    for _ in range(4):
        assert _metric(launcher, 'kyutai_stt_sessions_total{protocol="events"}') == before + sessions
        assert _metric(launcher, "kyutai_stt_frames_processed_total") > 0
        assert _metric(launcher, "kyutai_stt_slots_total") == SLOTS
    status = launcher.status().json()
    assert status["slots_in_use"] == 0
    # frames are counted once, in the engine process, not again by each worker's step listeners
    assert _metric(launcher, "kyutai_stt_frames_processed_total") == status["frames"]


async def _real_time_factors(launcher: Launcher, done: asyncio.Event) -> tuple[list[float], list[float]]:
    """/status's real_time_factor and /metrics' gauge, read while streams step (a factor covers the steps of the
    last 5 s, so reading it only afterwards would race with a slow machine), whichever worker answers."""
    from_status, from_metrics = [], []
    while not done.is_set():
        response = await asyncio.to_thread(launcher.status)
        from_status.append(response.json()["real_time_factor"])
        from_metrics.append(await asyncio.to_thread(_metric, launcher, "kyutai_stt_real_time_factor"))
        await asyncio.sleep(0.2)
    return from_status, from_metrics


def _metric(launcher: Launcher, name: str) -> float:
    text = httpx.get(launcher.http + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_a_dead_worker_loses_only_its_streams(launcher, reference, sounds):
    clip = sounds(1.6, 60)
    pages, decoded = opus_pages_and_decoded(clip)
    streams = await spread_streams(launcher, SLOTS)
    pids = [launcher.worker_of(s.ws) for s in streams]
    assert None not in pids
    victim = pids[0]
    role = next(r for r, p in launcher.roles().items() if p == victim)
    half = len(pages) // 2
    await asyncio.gather(*[s.send(pages[:half]) for s in streams])
    os.kill(victim, signal.SIGKILL)
    survivors = [s for s, pid in zip(streams, pids) if pid != victim]
    lost = [s for s, pid in zip(streams, pids) if pid == victim]
    # the engine frees the dead worker's slots at once (the launcher sees the process end)
    deadline = time.monotonic() + 2.0
    while launcher.status().json()["slots_in_use"] != len(survivors):
        assert time.monotonic() < deadline, "the dead worker's slots were not freed"
        await asyncio.sleep(0.05)
    for stream in lost:
        assert await stream.read_all() == 1006  # connection dropped with its process
    await asyncio.gather(*[s.send(pages[half:]) for s in survivors])
    codes = await asyncio.gather(*[s.finish() for s in survivors])
    assert codes == [1000] * len(survivors)
    assert all(exact(reference, s, decoded) for s in survivors)
    # the launcher started the worker again; the server is whole
    deadline = time.monotonic() + 300
    while launcher.roles().get(role) in (None, victim):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.5)
    assert launcher.status().status_code == 200


async def test_a_dead_engine_makes_status_503_everywhere(launchers, sounds):
    """Live streams on both workers fail promptly (error, then 1011: the workers' heartbeat, not a request's
    timeout, notices the engine is gone); /status is 503 and new streams get 1011 from every worker."""
    launcher = launchers[1]
    assert launcher.status().status_code == 200
    clip = sounds(0.4, 80).astype(np.float32)
    streams = await spread_streams(launcher, 2, "?format=pcm_f32le&steps=true")
    await asyncio.gather(*[s.send([clip.tobytes()]) for s in streams])
    await asyncio.gather(*[s.read_until_step(1) for s in streams])  # the engine is stepping them
    os.kill(launcher.roles()["engine"], signal.SIGKILL)
    # without the heartbeat they would wait for audio until the idle timeout (600 s here)
    codes = await asyncio.wait_for(asyncio.gather(*[s.read_all() for s in streams]), 30)
    assert codes == [1011] * len(streams)
    assert all(s.events[-1].type == "error" for s in streams)
    deadline = time.monotonic() + 15
    while launcher.status().status_code != 503:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    workers = {pid for role, pid in launcher.roles().items() if role.startswith("worker-")}
    answered = set()
    for _ in range(100):  # whichever worker answers (and is still seen holding the connection it refuses)
        assert launcher.status().status_code == 503
        assert _metric(launcher, "kyutai_stt_engine_healthy") == 0
        async with websockets.connect(launcher.ws + "/v1/stream") as ws:
            answered.add(launcher.worker_of(ws))
            answered.discard(None)
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
            assert ws.close_code == 1011
        if answered == workers:
            break
    assert answered == workers


async def test_sigterm_flushes_every_workers_streams(launcher, reference, sounds):
    """Last: it stops the server. Streams on both workers, mid-audio: each gets the words of all the audio it
    sent, then `end` and 1000; the launcher exits 0."""
    clip = sounds(2.0, 70).astype(np.float32)
    sent = clip[: 24000 * 6 // 5]
    streams = await spread_streams(launcher, 3, "?format=pcm_f32le&steps=true")
    await asyncio.gather(*[s.send([sent[i:i + 1920].tobytes() for i in range(0, sent.size, 1920)]) for s in streams])
    # every worker has read all of it: frames stepped + samples buffered (engine and spool) cover it. Not "the step
    # of the last frame": on CPU the engine steps 2 frames at a time, so an odd last frame waits for the end.
    prefix = reference.model.prefix_frames * 1920
    await asyncio.gather(*[s.read_until_received(prefix + sent.size) for s in streams])
    launcher.process.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*[s.read_all() for s in streams])
    assert codes == [1000] * len(streams)
    for stream in streams:
        assert stream.events[-1].type == "end" and stream.events[-1].duration == pytest.approx(sent.size / 24000)
        assert exact(reference, stream, sent)
    assert await asyncio.to_thread(launcher.process.wait, 60) == 0
