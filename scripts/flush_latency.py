#!/usr/bin/env python
"""Time from a finalize to its acknowledgement, in process: where a finalize's time goes, with 1 and N streams.

Each stream sends real speech (tests/fixtures/bria.opus, a different offset per stream) at real-time pace in 20 ms
chunks, as a voice agent does, and finalizes (``stream.flush.flush_now``, what Deepgram's ``Finalize`` and
Realtime's ``commit`` call) every ``--turn`` seconds; the sample is the time from the finalize to its ``Marker``
(every word of the audio so far out and closed). No server, no network: the engine, sessions and one asyncio loop,
so what is measured is the engine's side of TTFS (the steps a finalize needs, and the waiting behind other
streams' steps), for each ``--flush-seconds`` and each ``--lane-slots`` (the finalize lane's rows; 0: no lane,
every flush frame in full-batch steps, as before the lane). Also printed: the engine's mean step time (main batch
and lane apart), the steps per second, how busy the engine was, and the flush's frames (the engine's; a finalize
adds up to a step more).

    uv run python scripts/flush_latency.py --model /work/ckpt/tiny --slots 4 --clients 1,4 --lane-slots 0,2
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REAL_SPEECH  # noqa: E402

CHUNK_S = 0.02


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def one_stream(engine, pcm: np.ndarray, turn: float, seconds: float, start_delay: float,
                     pace: float) -> list[float]:
    from kyutai_stt.audio.constants import SAMPLE_RATE
    from kyutai_stt.messages.events import End, Marker
    from kyutai_stt.stream.flush import Timeline, flush_now
    from kyutai_stt.stream.session import Session

    await asyncio.sleep(start_delay)
    session, timeline = Session(engine), Timeline()
    session.start()
    asked: dict[int, float] = {}
    samples: list[float] = []

    async def read():
        async for event in session:
            if isinstance(event, Marker):
                samples.append(time.perf_counter() - asked.pop(event.id))
            elif isinstance(event, End):
                return

    reader = asyncio.create_task(read())
    chunk = int(CHUNK_S * SAMPLE_RATE)
    start, sent, marker, next_turn = time.perf_counter(), 0, 0, turn
    while sent < seconds * SAMPLE_RATE:
        piece = pcm[sent % (pcm.size - chunk):][:chunk]
        session.push_pcm(piece)
        sent += chunk
        if sent >= next_turn * SAMPLE_RATE:
            asked[marker] = time.perf_counter()
            flush_now(session, marker, timeline)
            marker += 1
            next_turn += turn
        await asyncio.sleep(max(0.0, start + sent / SAMPLE_RATE / pace - time.perf_counter()))  # real time x pace
    session.end()
    await reader
    return samples


def main(model: str = typer.Option(..., help="checkpoint folder or repo"),
         slots: int = typer.Option(4), clients: str = typer.Option("1,3,4", help="concurrencies, comma separated"),
         seconds: float = typer.Option(30.0, help="audio per stream"),
         turn: float = typer.Option(2.0, help="seconds of audio between finalizes"),
         frames_per_step: int = typer.Option(0, help="0: the engine's default for the device"),
         pace: float = typer.Option(1.0, help="audio sent at this x real time (below 1 on a machine too slow or "
                                    "too busy for real time, so the load stays below the engine's capacity)"),
         flush_seconds: str = typer.Option("0.08", help="the engine's flush_seconds, comma separated to compare "
                                            "(0.08: the minimal flush; 0.5: the flush before it)"),
         lane_slots: str = typer.Option("0,2", help="rows of the largest lane, comma separated to compare (0: none)"),
         device: str = typer.Option("cpu"), out: str = typer.Option("", help="JSON results here")) -> None:
    import torch

    from kyutai_stt.audio.decode import load_audio_file
    from kyutai_stt.engine.kyutai.checkpoint import load_model
    from kyutai_stt.engine.kyutai.engine import Engine, default_frames_per_step

    stt = load_model(model, device, "float32" if device == "cpu" else "bfloat16")
    k = frames_per_step or default_frames_per_step(torch.device(device))
    speech = load_audio_file(REAL_SPEECH)
    rows = []
    runs = [(int(c), float(f), int(lane)) for c in clients.split(",") for f in flush_seconds.split(",")
            for lane in lane_slots.split(",")]
    for n, flush, lane in runs:
        # batch-invariant mode in every run (the lane needs it; the same mode keeps lane and no-lane comparable)
        engine = Engine(stt, slots, frames_per_step=k, flush_seconds=flush, lane_slots=lane, batch_invariant_mode="on")
        engine.warmup()
        engine.start()
        steps: list[float] = []
        lane_steps: list[float] = []
        counted = [0]

        def on_step(frames: int, seconds: float, streams: int) -> None:
            # a lane step was planned (and counted) just before it ran; the next plan comes after this call
            (lane_steps if engine.lane_steps != counted[0] else steps).append(seconds)
            counted[0] = engine.lane_steps

        engine.add_step_listener(on_step)

        async def run():
            offsets = [int(i * speech.size / n) for i in range(n)]
            return await asyncio.gather(*(one_stream(engine, np.roll(speech, -o), turn, seconds, i * turn / n / pace,
                                                     pace)
                                          for i, o in enumerate(offsets)))

        t0 = time.perf_counter()
        samples = [s for stream in asyncio.run(run()) for s in stream]
        wall = time.perf_counter() - t0
        engine.stop()
        row = dict(clients=n, flush_seconds=flush, lane_slots=lane, pace=pace, finalizes=len(samples),
                   median=percentile(samples, 50), p95=percentile(samples, 95), p99=percentile(samples, 99),
                   max=max(samples), step_mean=float(np.mean(steps)) if steps else float("nan"),
                   lane_step_mean=float(np.mean(lane_steps)) if lane_steps else float("nan"),
                   lane_steps=len(lane_steps), steps_per_s=(len(steps) + len(lane_steps)) / wall,
                   busy=(sum(steps) + sum(lane_steps)) / wall, flush_frames=engine.info.flush_frames,
                   frames_per_step=k)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| clients | lane rows | flush frames | finalizes | median s | p95 s | p99 s | max s | step ms | lane step ms "
          "| lane steps | steps/s | engine busy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['lane_slots']} | {r['flush_frames']} | {r['finalizes']} | {r['median']:.3f} | "
              f"{r['p95']:.3f} | {r['p99']:.3f} | {r['max']:.3f} | {1000 * r['step_mean']:.0f} | "
              f"{1000 * r['lane_step_mean']:.0f} | {r['lane_steps']} | {r['steps_per_s']:.1f} | {100 * r['busy']:.0f} % |")
    if out:
        Path(out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    typer.run(main)
