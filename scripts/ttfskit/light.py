"""Light TTFS clients: one asyncio task per session, the same method as the Pipecat pipeline without Pipecat.

Each session speaks the plan's utterances at real-time pace in 20 ms chunks, sends its protocol's finalize right
after the chunk at which Pipecat's Silero VAD reported the stop (the plan), keeps sending silence until the final
transcript arrives (as Pipecat's stt-benchmark transport does), then a short gap, then the next utterance.
TTFS = arrival of the final - (moment the VAD-stop chunk was sent - stop_secs).

Protocols and what ends a turn:
- ``deepgram``: ``/v1/listen`` linear16 16 kHz, ``Finalize`` -> the ``Results`` with ``from_finalize: true``.
- ``realtime``: ``/v1/realtime?intent=transcription`` pcm16 24 kHz, ``turn_detection: null``,
  ``input_audio_buffer.commit`` -> ``conversation.item.input_audio_transcription.completed``.
- ``kyutai``: ``/api/asr-streaming`` float pcm 24 kHz, ``Marker`` then the model's delay of zeros sent at once
  (the "flush trick" Kyutai's own clients and unmute use; moshi-server has no flush) -> the ``Marker`` echo.
- ``stream``: ``/v1/stream`` pcm_s16le 16 kHz, ``marker`` control plus the same zeros -> the ``marker`` event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np

from .plan import CHUNK_MS, STOP_SECS, Utterance, int16_bytes, to_rate

PROTOCOLS = ("deepgram", "realtime", "kyutai", "stream")
FINAL_TIMEOUT_S = 20.0  # a final that has not come by then is counted as missing (--final-timeout)


@dataclass
class SessionResult:
    ttfs: list[float] = field(default_factory=list)  # seconds, one per utterance whose final came
    missing: int = 0  # finalizes never answered within FINAL_TIMEOUT_S
    audio_s: float = 0.0  # audio sent (speech and silence), seconds
    late_p99_s: float = 0.0  # how late the client sent its chunks (p99): a load generator that lags skews TTFS
    error: str | None = None


class Protocol:
    """How one protocol connects, sends a chunk, finalizes and recognises its final."""

    rate = 16000

    def __init__(self, base_ws: str, delay_frames: int, frames_per_step: int):
        self.base_ws, self.delay_frames, self.frames_per_step = base_ws, delay_frames, frames_per_step
        self.markers = 0

    def url(self) -> str:
        raise NotImplementedError

    def first(self) -> list:  # messages sent on connect
        return []

    def audio(self, pcm: np.ndarray):
        raise NotImplementedError

    def finalize(self) -> list:
        raise NotImplementedError

    def is_final(self, message) -> bool:
        raise NotImplementedError

    def flush_zeros(self) -> np.ndarray:
        # the client-side flush: the model's delay plus the frames of one engine step, as silence sent at once
        return np.zeros(round((self.delay_frames + self.frames_per_step) * 0.08 * self.rate), np.float32)


class Deepgram(Protocol):
    def url(self):
        return f"{self.base_ws}/v1/listen?encoding=linear16&sample_rate=16000&channels=1&interim_results=true"

    def audio(self, pcm):
        return int16_bytes(pcm)

    def finalize(self):
        return [json.dumps({"type": "Finalize"})]

    def is_final(self, message):
        if isinstance(message, bytes):
            return False
        event = json.loads(message)
        return event.get("type") == "Results" and bool(event.get("from_finalize"))


class Realtime(Protocol):
    rate = 24000

    def url(self):
        return f"{self.base_ws}/v1/realtime?intent=transcription"

    def first(self):
        return [json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}}}})]

    def audio(self, pcm):
        return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(int16_bytes(pcm)).decode()})

    def finalize(self):
        return [json.dumps({"type": "input_audio_buffer.commit"})]

    def is_final(self, message):
        return json.loads(message).get("type") == "conversation.item.input_audio_transcription.completed"


class Kyutai(Protocol):
    rate = 24000

    def url(self):
        return f"{self.base_ws}/api/asr-streaming"

    def audio(self, pcm):
        import msgpack

        return msgpack.packb({"type": "Audio", "pcm": pcm.astype(np.float32).tolist()}, use_single_float=True)

    def finalize(self):
        import msgpack

        self.markers += 1
        return [msgpack.packb({"type": "Marker", "id": self.markers}), self.audio(self.flush_zeros())]

    def is_final(self, message):
        import msgpack

        if not isinstance(message, bytes):
            return False
        return msgpack.unpackb(message).get("type") == "Marker"  # echoes come in order: the session counts them


class Stream(Protocol):
    def url(self):
        return f"{self.base_ws}/v1/stream?format=pcm_s16le&sample_rate=16000"

    def audio(self, pcm):
        return int16_bytes(pcm)

    def finalize(self):
        self.markers += 1
        return [json.dumps({"type": "marker", "id": self.markers}), self.audio(self.flush_zeros())]

    def is_final(self, message):
        if isinstance(message, bytes):
            return False
        return json.loads(message).get("type") == "marker"  # echoes come in order: the session counts them


CLIENTS = {"deepgram": Deepgram, "realtime": Realtime, "kyutai": Kyutai, "stream": Stream}


def rated(source: np.ndarray, utterances: list[Utterance], rate: int) -> list[np.ndarray]:
    return [to_rate(source[u.start:u.start + u.length], rate) for u in utterances]


async def session(protocol: Protocol, speech: list[np.ndarray], utterances: list[Utterance], start_delay: float,
                  gap_s: float = 0.3, lead_s: float = 0.5) -> SessionResult:
    """One client: ``speech[i]`` (at the protocol's rate) then silence, finalize at ``utterances[i].vad_stop_s``."""
    import websockets

    await asyncio.sleep(start_delay)
    result = SessionResult()
    chunk = protocol.rate * CHUNK_MS // 1000
    silence = np.zeros(chunk, np.float32)
    final = asyncio.Event()
    arrived: list[float] = []  # the acknowledgements, in order: the k-th answers the k-th finalize
    finalizes = 0
    try:
        async with websockets.connect(protocol.url(), max_size=None, open_timeout=120, ping_interval=None,
                                      close_timeout=30) as ws:
            for message in protocol.first():
                await ws.send(message)

            async def receive():
                async for message in ws:
                    if protocol.is_final(message):
                        arrived.append(time.perf_counter())
                        if len(arrived) == finalizes:  # a late answer to an earlier (missed) turn is not this one's
                            final.set()

            reader = asyncio.create_task(receive())
            t0, sent, late = time.perf_counter(), 0, []

            async def send(pcm: np.ndarray) -> float:
                """Send one chunk at its real-time moment; returns when it went out."""
                nonlocal sent
                due = t0 + sent * CHUNK_MS / 1000
                if due > time.perf_counter():
                    await asyncio.sleep(due - time.perf_counter())
                late.append(time.perf_counter() - due)
                await ws.send(protocol.audio(pcm))
                sent += 1
                return time.perf_counter()

            for _ in range(round(lead_s * 1000 / CHUNK_MS)):
                await send(silence)
            for pcm, utterance in zip(speech, utterances):
                stop_chunk = round(utterance.vad_stop_s * 1000 / CHUNK_MS)  # chunks up to the VAD's stop
                total = max(stop_chunk, -(-len(pcm) // chunk))
                final.clear()
                stopped_at = None
                for k in range(total):
                    part = pcm[k * chunk:(k + 1) * chunk]
                    at = await send(np.pad(part, (0, chunk - len(part))) if len(part) else silence)
                    if k + 1 == stop_chunk:  # the VAD reports the stop after this chunk: the agent finalizes
                        stopped_at = at
                        finalizes += 1
                        for message in protocol.finalize():
                            await ws.send(message)
                deadline = time.perf_counter() + FINAL_TIMEOUT_S
                while not final.is_set() and time.perf_counter() < deadline and not reader.done():
                    await send(silence)  # the microphone goes on while the agent waits
                if final.is_set():
                    result.ttfs.append(arrived[-1] - (stopped_at - STOP_SECS))
                else:
                    result.missing += 1
                    if reader.done():
                        raise RuntimeError(f"connection closed: {reader.exception()!r}")
                for _ in range(round(gap_s * 1000 / CHUNK_MS)):
                    await send(silence)
            result.audio_s = sent * CHUNK_MS / 1000
            result.late_p99_s = float(np.percentile(late, 99)) if late else 0.0
            reader.cancel()
    except Exception as exc:  # noqa: BLE001 - a failed session is reported, never stops the others
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


async def run_sessions(protocol: str, base_ws: str, delay_frames: int, frames_per_step: int, source: np.ndarray,
                       utterances: list[Utterance], sessions: int, per_session: int, first: int = 0,
                       ramp_s: float = 1.0, seed: int = 0) -> list[SessionResult]:
    """``sessions`` concurrent clients, each starting within ``ramp_s`` and speaking ``per_session`` utterances
    (a different rotation of the plan each)."""
    cls = CLIENTS[protocol]
    speech = rated(source, utterances, cls.rate)
    rng = random.Random(seed + first)
    tasks = []
    for s in range(first, first + sessions):
        order = [(s * 5 + i) % len(utterances) for i in range(per_session)]
        tasks.append(session(cls(base_ws, delay_frames, frames_per_step), [speech[i] for i in order],
                             [utterances[i] for i in order], rng.uniform(0, ramp_s)))
    return list(await asyncio.gather(*tasks))


def percentiles(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {"count": 0, "p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan}
    return {"count": int(a.size), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}
