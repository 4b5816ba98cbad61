"""What the scripts share, and the tests that drive an engine the way the scripts do: real speech and cuts of it,
a stream fed from its own thread, ``kyutai-stt serve`` in a subprocess on a free port, the server's processes and
memory, a real-time Ogg/Opus WebSocket client, and the reference words a stream must get.

The scripts import it as ``harness`` (their folder is on ``sys.path`` when they run; ``tests/conftest.py`` puts it
there for the tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kyutai_stt.audio.constants import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE  # a leaf module: no torch

REPO = Path(__file__).resolve().parents[1]
REAL_SPEECH = REPO / "tests" / "fixtures" / "bria.opus"  # 28 s of English speech (source and licence: README there)
FRAME_S = FRAME_SIZE / SAMPLE_RATE  # one audio frame of the model, 80 ms


# ============================================================================================ audio
def speech_cuts(sources: list[np.ndarray], count: int, seconds: tuple[float, float],
                rng: random.Random) -> list[np.ndarray]:
    """``count`` cuts of random length in ``seconds`` at random places, from the sources in turn."""
    cuts = []
    for index in range(count):
        length = int(rng.uniform(*seconds) * SAMPLE_RATE)
        source = sources[index % len(sources)]
        start = rng.randrange(0, max(1, len(source) - length))
        cuts.append(np.ascontiguousarray(source[start:start + length], np.float32))
    return cuts


# ============================================================================================ one stream, in process
class Feeder:
    """One stream through an in-process engine, from its own thread: it joins after ``delay`` or a random delay up
    to ``join_within`` seconds (waiting for a free slot in ``engine.open``), pushes chunks of sizes drawn from
    ``chunks`` with, after each, a pause of up to ``pause[1]`` s with chance ``pause[0]`` (the slot sits out
    steps), then closes. ``outputs`` gets the engine's step outputs, ``end`` its last event (an end or a failure).
    ``open_now``: take the slot in the constructor, so the caller knows which one it is."""

    def __init__(self, engine, pcm: np.ndarray, seed: int, *, chunks=(960, 1920, 3840, 9600, 24000),
                 pause: tuple[float, float] = (0.25, 0.3), join_within: float = 0.0, delay: float | None = None,
                 open_now: bool = False, options=None):
        from kyutai_stt.engine.kyutai.engine import ContextReset, StepOutput

        self._step_output, self._context_reset = StepOutput, ContextReset
        self.options = options  # the stream's DecodingOptions (None: greedy)
        self.resets: list[int] = []  # frames of its context resets
        self.engine, self.pcm, self.rng = engine, pcm, random.Random(seed)
        self.chunks, self.pause, self.join_within, self.delay = chunks, pause, join_within, delay
        self.outputs: list = []
        self.end = None
        self.done = threading.Event()
        self.handle = engine.open(self.sink, options=options) if open_now else None  # open_now: the slot is known at once
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sink(self, events) -> None:
        for event in events:
            if isinstance(event, self._step_output):
                self.outputs.append(event)
            elif isinstance(event, self._context_reset):
                self.resets.append(event.frame)
            else:
                self.end = event
                self.done.set()

    def run(self) -> None:
        time.sleep(self.rng.uniform(0, self.join_within) if self.delay is None else self.delay)
        if self.handle is None:
            self.handle = self.engine.open(self.sink, timeout=600, options=self.options)  # joins when another stream leaves
        chance, longest = self.pause
        position = 0
        while position < len(self.pcm):
            size = self.rng.choice(self.chunks)
            self.engine.push(self.handle, self.pcm[position:position + size])
            position += size
            if self.rng.random() < chance:
                time.sleep(self.rng.uniform(0, longest))
        self.engine.close(self.handle)

    @property
    def tokens(self) -> list[int]:
        return [o.token for o in self.outputs]


def run_feeders(feeders: list[Feeder], timeout: float = 600) -> None:
    """Start every feeder's thread and wait until every stream has ended."""
    for f in feeders:
        f.thread.start()
    for f in feeders:
        if not f.done.wait(timeout):
            raise TimeoutError("a stream did not finish")


# ============================================================================================ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (engine process, workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def rss_bytes(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def gpu_mib_by_pid() -> dict[int, int]:
    """GPU memory of every process nvidia-smi lists (empty without a GPU)."""
    with contextlib.suppress(Exception):
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout
        return {int(p): int(m) for p, m in (line.split(",") for line in text.strip().splitlines())}
    return {}


class ServerProcess:
    """``kyutai-stt serve`` in a subprocess (its own interpreter, as in production) on a free port.

    ``options``: the command's options (``--model``, ``--slots``...); ``env``: more environment (settings as
    ``KYUTAI_STT_*``); ``workers``: front-end processes (default: the server's choice). Its output goes to
    ``log_path``."""

    def __init__(self, log_path: Path, options: list[str] = (), env: dict[str, str] | None = None,
                 port: int = 0, workers: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        self.workers = workers
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w")
        environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the server makes its own
        command = [sys.executable, "-m", "kyutai_stt.cli", "serve", *options, "--port", str(self.port)]
        if workers is not None:
            command += ["--workers", str(workers)]
        self.proc = subprocess.Popen(command, cwd=REPO, env=environment, stdout=self.log, stderr=subprocess.STDOUT)

    def status(self) -> dict | None:
        import httpx

        with contextlib.suppress(Exception):
            response = httpx.get(self.url + "/status", timeout=10)
            if response.status_code == 200:
                return response.json()
        return None

    def wait_ready(self, timeout: float = 900.0) -> dict:
        """Until /status answers (and, with several workers, every worker process is up); its answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_path}")
            up = (self.workers in (None, 1)
                  or sum(role_of(p) == "worker" for p in process_tree(self.proc.pid)) == self.workers)
            status = self.status() if up else None
            if status is not None:
                return status
            time.sleep(0.3)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s; see {self.log_path}")

    def rss(self) -> int | None:
        """Resident memory of the server's main process."""
        return rss_bytes(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL to the whole tree if it does not end within a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in process_tree(self.proc.pid)[::-1]:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def role_of(pid: int) -> str:
    """engine, worker or server: what the server's launcher told the process it is."""
    with contextlib.suppress(OSError):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"KYUTAI_STT_PROCESS_ROLE="):
                return item.split(b"=", 1)[1].decode().split("-")[0]
    return "server"


# ============================================================================================ a real-time client
@dataclass
class OpusClip:
    """A clip as a streaming client sends it: Ogg/Opus pages, and for each 80 ms audio frame the page after which
    the server can decode it (found with the server's own decoder)."""

    pages: list[bytes]
    ready_page: list[int]
    frames: int


def opus_clip(pcm: np.ndarray) -> OpusClip:
    from kyutai_stt.audio.decode import OggOpusDecoder, encode_ogg_opus

    pages = encode_ogg_opus(pcm)
    decoder, ready, total = OggOpusDecoder(), [], 0
    for p, page in enumerate(pages):
        total += len(decoder.feed(page))
        while (len(ready) + 1) * FRAME_SIZE <= total:
            ready.append(p)
    return OpusClip(pages, ready, -(-total // FRAME_SIZE))


def synthetic_opus_clip(seconds: float, seed: int) -> OpusClip:
    """Speech-like sound (the content barely changes the cost, but codes should vary like real audio)."""
    from kyutai_stt.engine.kyutai.testing_checkpoint import synthetic_sounds

    return opus_clip(synthetic_sounds(seconds, 7000 + seed))


@dataclass
class ClientRun:
    """What one real-time client measured (seconds). ``word``: a word's arrival minus the moment the audio of the
    step that produced it was sent (beyond the model's delay); ``word_incl_delay``: the same from the audio of the
    word's own frame; ``lost``: audio frames no ``step`` event came for."""

    word: list[float] = field(default_factory=list)
    word_incl_delay: list[float] = field(default_factory=list)
    frame: list[float] = field(default_factory=list)
    send_lateness: list[float] = field(default_factory=list)
    flush: float | None = None  # end sent -> `end` received
    flush_last_word: float | None = None  # end sent -> the last word, when it came after
    words: int = 0
    lost: int = 0
    audio_s: float = 0.0
    ended: bool = False  # the `end` event came
    error: str | None = None


async def realtime_client(url: str, clip: OpusClip, start_delay: float, delay_frames: int,
                          prefix_frames: int) -> ClientRun:
    """One client of ``/v1/stream`` (``format=opus&steps=true``) sending ``clip`` at real time after
    ``start_delay``, then ``end``. Never raises: a failure is its ``error``."""
    import websockets

    await asyncio.sleep(start_delay)
    run = ClientRun()
    sent_at = [math.nan] * len(clip.pages)
    steps_seen: set[int] = set()
    end_sent = last_word_at = None
    try:
        async with websockets.connect(f"{url}/v1/stream?format=opus&steps=true", max_size=None, open_timeout=60,
                                      ping_interval=None) as ws:
            t0 = time.perf_counter()

            async def sender():
                nonlocal end_sent
                for k, page in enumerate(clip.pages):
                    due = t0 + (k + 1) * FRAME_S  # page k holds audio captured until then (80 ms pages)
                    if due > time.perf_counter():
                        await asyncio.sleep(due - time.perf_counter())
                    await ws.send(page)
                    sent_at[k] = time.perf_counter()
                    run.send_lateness.append(max(0.0, sent_at[k] - due))
                await ws.send(json.dumps({"type": "end"}))
                end_sent = time.perf_counter()

            def audio_sent(step: int) -> float | None:
                a = step - prefix_frames
                if a < 0:
                    return t0
                return sent_at[clip.ready_page[a]] if a < len(clip.ready_page) else None  # None: flush frames

            task = asyncio.create_task(sender())
            last_step = -1
            try:
                async for message in ws:
                    t = time.perf_counter()
                    event = json.loads(message)
                    kind = event.get("type")
                    if kind == "step":
                        last_step = event["step_idx"]
                        steps_seen.add(last_step)
                        a = audio_sent(last_step)
                        if a is not None and not math.isnan(a):
                            run.frame.append(t - a)
                    elif kind == "word":
                        run.words += 1
                        last_word_at = t
                        a = audio_sent(last_step)
                        if a is not None and not math.isnan(a):
                            run.word.append(t - a)
                            a0 = audio_sent(max(prefix_frames, last_step - delay_frames))
                            if a0 is not None:
                                run.word_incl_delay.append(t - a0)
                    elif kind == "end":
                        if end_sent is not None:
                            run.flush = t - end_sent
                            if last_word_at is not None and last_word_at >= end_sent:
                                run.flush_last_word = last_word_at - end_sent
                        run.audio_s, run.ended = event["duration"], True
                        break
                    elif kind == "error":
                        raise RuntimeError(event.get("message"))
            finally:
                task.cancel()
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the other clients
        run.error = f"{type(exc).__name__}: {exc}"[:200]
    if not run.audio_s:  # no `end`: count the audio sent
        run.audio_s = sum(not math.isnan(t) for t in sent_at) / len(clip.pages) * clip.frames * FRAME_S
    run.lost = sum(1 for f in range(prefix_frames, prefix_frames + clip.frames) if f not in steps_seen)
    return run


# ============================================================================================ reference words
def expected_from_outputs(model, outputs, audio_seconds: float | None = None) -> list:
    """Text/Word/WordEnd events of the reference outputs, as a session assembles them: with ``audio_seconds``,
    no time past the end of the audio (the flush silence is not audio)."""
    from kyutai_stt.stream.words import WordAssembler

    assembler = WordAssembler(model.tokenizer.id_to_piece, model.delay_frames + model.prefix_frames)
    if audio_seconds is not None:
        assembler.audio_end = audio_seconds
    events = []
    for out in outputs:
        events += assembler.feed(out.frame, out.token)
    return events + assembler.finish(len(outputs))


def word_tuples(events) -> list[tuple[str, float, float]]:
    """(text, start, end) of every word among the events, times to the millisecond."""
    from kyutai_stt.messages.events import Word, WordEnd
    from kyutai_stt.stream.words import pair_words

    return [(w.text, round(w.start, 3), round(w.end, 3))
            for w in pair_words(e for e in events if isinstance(e, (Word, WordEnd)))]


def diff(got: list, want: list) -> tuple[int, int]:
    """(lost, wrong): words of the reference missing from what came, and words that came but are not the
    reference's (replaced or extra)."""
    lost = wrong = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=want, b=got, autojunk=False).get_opcodes():
        if op == "delete":
            lost += i2 - i1
        elif op == "insert":
            wrong += j2 - j1
        elif op == "replace":
            wrong += j2 - j1
            lost += max(0, (i2 - i1) - (j2 - j1))
    return lost, wrong


def model_timing(model: str) -> dict:
    """The model's delay and silence prefix in frames, from a checkpoint folder's config.json (0 without one):
    what a client needs to tell the system's latency from the model's own delay."""
    config = Path(model) / "config.json"
    stt = json.loads(config.read_text()).get("stt_config", {}) if config.is_file() else {}
    return {"delay_frames": round(float(stt.get("audio_delay_seconds", 0.0)) * FRAME_RATE),
            "prefix_frames": round(float(stt.get("audio_silence_prefix_seconds", 0.0)) * FRAME_RATE)}
