"""`bench.py loadgen` (internal): one load-generator process of `e2e`, real-time Ogg/Opus clients."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer

from .common import FRAME_MS, now


@dataclass
class Clip:
    pages: list[bytes]
    ready_page: list[int]  # ready_page[a]: index of the page after which audio frame a is fully decodable


def make_clip(seconds: float, seed: int) -> Clip:
    from kyutai_stt.audio.decode import OggOpusDecoder, encode_ogg_opus
    from kyutai_stt.audio.constants import FRAME_SIZE
    from kyutai_stt.engine.kyutai.testing_checkpoint import synthetic_sounds

    pcm = synthetic_sounds(seconds, 7000 + seed)
    pages = encode_ogg_opus(pcm)
    decoder = OggOpusDecoder()  # exactly what the server runs: when does it have each 80 ms frame?
    ready: list[int] = []
    total = 0
    for p, page in enumerate(pages):
        total += len(decoder.feed(page))
        while (len(ready) + 1) * FRAME_SIZE <= total:
            ready.append(p)
    return Clip(pages, ready)


async def run_client(url: str, clip: Clip, start_delay: float, delay_frames: int, prefix_frames: int) -> dict:
    import websockets

    await asyncio.sleep(start_delay)
    loop_time = now
    samples: dict[str, list[float]] = {k: [] for k in ("word_latency", "word_latency_incl_delay", "frame_latency",
                                                       "flush", "flush_last_word", "send_lateness")}
    sent_at: list[float] = [math.nan] * len(clip.pages)
    end_sent: list[float] = []
    words = 0
    last_word_t = None
    async with websockets.connect(f"{url}/v1/stream?format=opus&steps=true", max_size=None, open_timeout=60,
                                  ping_interval=None) as ws:
        t_start = loop_time()

        async def sender() -> None:
            for k, page in enumerate(clip.pages):
                due = t_start + (k + 1) * FRAME_MS / 1000  # page k holds audio captured until then
                delay = due - loop_time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(page)
                sent_at[k] = loop_time()
                samples["send_lateness"].append(max(0.0, sent_at[k] - due))
            await ws.send(json.dumps({"type": "end"}))
            end_sent.append(loop_time())

        def arrival(frame: int) -> float | None:
            a = frame - prefix_frames
            if a < 0:
                return t_start
            if a >= len(clip.ready_page):
                return None  # a flush frame: counted in the flush figures
            return sent_at[clip.ready_page[a]]

        task = asyncio.create_task(sender())
        last_step = -1
        ended = False
        try:
            async for message in ws:
                t = loop_time()
                event = json.loads(message)
                kind = event.get("type")
                if kind == "step":
                    last_step = event["step_idx"]
                    a = arrival(last_step)
                    if a is not None and not math.isnan(a):
                        samples["frame_latency"].append(t - a)
                elif kind == "word":
                    words += 1
                    last_word_t = t
                    a = arrival(last_step)
                    if a is not None and not math.isnan(a):
                        samples["word_latency"].append(t - a)
                        a0 = arrival(max(prefix_frames, last_step - delay_frames))
                        if a0 is not None:
                            samples["word_latency_incl_delay"].append(t - a0)
                elif kind == "end":
                    ended = True
                    if end_sent:
                        samples["flush"].append(t - end_sent[0])
                        if last_word_t is not None and last_word_t >= end_sent[0]:
                            samples["flush_last_word"].append(last_word_t - end_sent[0])
                    break
                elif kind == "error":
                    raise RuntimeError(event.get("message"))
        finally:
            task.cancel()
    if not ended:
        raise RuntimeError("connection closed before the end event")
    return {"samples": samples, "words": words}


async def loadgen_main(url: str, clients: int, first: int, seconds: float, ramp: float, delay_frames: int,
                       prefix_frames: int, distinct: int) -> dict:
    clips = [make_clip(seconds, i) for i in range(min(distinct, clients))]
    rng = np.random.default_rng(first)
    starts = rng.uniform(0, ramp, size=clients) if ramp > 0 else np.zeros(clients)
    tasks = [run_client(url, clips[(first + i) % len(clips)], float(starts[i]), delay_frames, prefix_frames)
             for i in range(clients)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    pooled: dict[str, list[float]] = {}
    errors, completed, words = [], 0, 0
    for r in results:
        if isinstance(r, BaseException):
            errors.append(f"{type(r).__name__}: {r}")
            continue
        completed += 1
        words += r["words"]
        for k, v in r["samples"].items():
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
