"""`bench.py loadgen` (internal): one load-generator process of `e2e`, real-time Ogg/Opus clients."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import typer
from harness import ClientRun, realtime_client, synthetic_opus_clip  # scripts/harness.py (bench.py puts it on the path)


def samples(run: ClientRun) -> dict[str, list[float]]:
    """One client's measures under the names of the e2e report (seconds)."""
    return {"word_latency": run.word, "word_latency_incl_delay": run.word_incl_delay, "frame_latency": run.frame,
            "flush": [run.flush] if run.flush is not None else [],
            "flush_last_word": [run.flush_last_word] if run.flush_last_word is not None else [],
            "send_lateness": run.send_lateness}


async def loadgen_main(url: str, clients: int, first: int, seconds: float, ramp: float, delay_frames: int,
                       prefix_frames: int, distinct: int) -> dict:
    clips = [synthetic_opus_clip(seconds, i) for i in range(min(distinct, clients))]
    rng = np.random.default_rng(first)
    starts = rng.uniform(0, ramp, size=clients) if ramp > 0 else np.zeros(clients)
    runs = await asyncio.gather(*(realtime_client(url, clips[(first + i) % len(clips)], float(starts[i]),
                                                  delay_frames, prefix_frames) for i in range(clients)))
    pooled: dict[str, list[float]] = {}
    errors, completed, words = [], 0, 0
    for run in runs:
        if run.error or not run.ended:
            errors.append(run.error or "RuntimeError: connection closed before the end event")
            continue
        completed += 1
        words += run.words
        for k, v in samples(run).items():
            pooled.setdefault(k, []).extend(v)
    return {"completed": completed, "words": words, "errors": errors, "samples_s": pooled}


def loadgen(
    url: str = typer.Option(...),
    clients: int = typer.Option(1),
    first_client: int = typer.Option(0),
    seconds: float = typer.Option(10.0),
    ramp: float = typer.Option(1.0),
    delay_frames: int = typer.Option(0),
    prefix_frames: int = typer.Option(0),
    distinct: int = typer.Option(8, help="Distinct clips (clients reuse them)."),
    out: Path = typer.Option(...),
) -> None:
    """(internal) The load generator: real-time Ogg/Opus clients; raw samples to JSON."""
    result = asyncio.run(loadgen_main(url, clients, first_client, seconds, ramp, delay_frames, prefix_frames, distinct))
    out.write_text(json.dumps(result))
