"""The utterances every TTFS client speaks, and where Pipecat's Silero VAD says each one stops.

Real speech (tests/fixtures/bria.opus) cut into utterances of 1.5-3.5 s. Each cut is kept only if Pipecat's own
``SileroVADAnalyzer(params=VADParams(stop_secs=0.2))``, fed 20 ms chunks of the 16 kHz utterance followed by
silence, reports exactly one start and one stop (no pause inside the utterance that would make a voice agent
finalize twice). The stop's offset from the utterance's first sample is what the light clients replay: they send
their finalize right after the chunk at which Pipecat's pipeline would have sent its own.

The plan is a small JSON file (``ttfs_plan.json`` beside this folder), so a machine without Pipecat or ONNX Runtime
(the lent GPU machine) replays the same VAD decisions; ``ttfs_bench.py plan`` rebuilds it.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from harness import REAL_SPEECH  # scripts/harness.py

PLAN_PATH = Path(__file__).resolve().parent.parent / "ttfs_plan.json"
CHUNK_MS = 20  # Pipecat's stt-benchmark: 20 ms chunks
VAD_RATE = 16000  # Silero runs at 16 kHz; Pipecat's benchmark sends 16 kHz audio
STOP_SECS = 0.2  # VADParams(stop_secs=0.2), the benchmark's default


@dataclass(frozen=True)
class Utterance:
    start: int  # first sample in the 24 kHz source
    length: int  # samples at 24 kHz
    vad_stop_s: float  # Silero's stop, seconds from the utterance's first sample (end of the chunk that reported it)
    speech_s: float  # the utterance's length in seconds


def load_source(path: Path = REAL_SPEECH) -> np.ndarray:
    from kyutai_stt.audio.decode import load_audio_file

    return load_audio_file(path)


def to_rate(pcm24: np.ndarray, rate: int) -> np.ndarray:
    """24 kHz float audio at ``rate`` (whole stream: the resampler's tail included)."""
    from kyutai_stt.audio.resample import StreamResampler

    if rate == 24000:
        return pcm24
    resampler = StreamResampler(24000, rate)
    return np.concatenate([resampler.feed(pcm24), resampler.flush()]).astype(np.float32)


def int16_bytes(pcm: np.ndarray) -> bytes:
    return np.clip(np.round(pcm * 32767), -32768, 32767).astype("<i2").tobytes()


async def vad_events(pcm16k: np.ndarray, stop_secs: float = STOP_SECS) -> list[tuple[str, float]]:
    """(``start``/``stop``, seconds) as Pipecat's Silero analyzer reports them over 20 ms chunks."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams, VADState

    analyzer = SileroVADAnalyzer(params=VADParams(stop_secs=stop_secs))
    analyzer.set_sample_rate(VAD_RATE)  # what the pipeline's StartFrame does
    data = int16_bytes(pcm16k)
    step = VAD_RATE * CHUNK_MS // 1000 * 2
    events, speaking = [], False
    for k, offset in enumerate(range(0, len(data), step)):
        state = await analyzer.analyze_audio(data[offset:offset + step])
        now = (k + 1) * CHUNK_MS / 1000
        if state == VADState.SPEAKING and not speaking:
            speaking = True
            events.append(("start", now))
        elif state == VADState.QUIET and speaking:
            speaking = False
            events.append(("stop", now))
    return events


def build(count: int = 24, seed: int = 19, seconds: tuple[float, float] = (1.5, 3.5)) -> list[Utterance]:
    """``count`` utterances whose VAD shows one start and one stop, after the utterance's end minus 0.3 s."""
    source = load_source()
    rng = random.Random(seed)
    out: list[Utterance] = []
    tries = 0
    while len(out) < count and tries < 50 * count:
        tries += 1
        length = int(rng.uniform(*seconds) * 24000)
        start = rng.randrange(0, len(source) - length)
        cut = source[start:start + length]
        padded = np.concatenate([cut, np.zeros(24000 * 2, np.float32)])  # the silence the client sends after it
        events = asyncio.run(vad_events(to_rate(padded, VAD_RATE)))
        kinds = [k for k, _ in events]
        if kinds != ["start", "stop"] or events[1][1] < length / 24000 - 0.3:
            continue
        out.append(Utterance(start, length, round(events[1][1], 3), round(length / 24000, 3)))
    return out


def save(utterances: list[Utterance], path: Path = PLAN_PATH) -> None:
    path.write_text(json.dumps({"source": "tests/fixtures/bria.opus",
                                "vad": f"SileroVADAnalyzer(stop_secs={STOP_SECS})",
                                "chunk_ms": CHUNK_MS, "utterances": [asdict(u) for u in utterances]}, indent=1) + "\n")


def load(path: Path = PLAN_PATH) -> list[Utterance]:
    return [Utterance(**u) for u in json.loads(path.read_text())["utterances"]]
