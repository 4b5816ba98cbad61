#!/usr/bin/env python
"""One stream of hours through a real server, checked word for word against the single-stream reference.

What only a long stream exercises: the LM's and Mimi's ring KV caches wrapping many times, position counters in
the tens of thousands, word times in the hours, and per-stream memory that must stay flat. The stream is sent
as fast as the server reads it (the server's backpressure paces it), while a neighbour lane streams short clips
at real time through the same batch; both are checked against the reference. Reported: lost and wrong words
(goal: zero), how far every step's VAD probabilities are from the reference's (they follow the LM's state at
every frame, even where a random test model says nothing; float rounding differs with batch size and frames per
call, so a near-tie Mimi code can flip now and then: reported, not failed), the neighbour's results, the server's
memory over time, and how fast the hours went through.

    python scripts/long_stream.py --model /tmp/ck_tiny --hours 2 --out artifacts/long-stream

The reference encodes 25 frames per Mimi call (identical codes, see ``kyutai_stt.engine.kyutai.attention_cache``) and is
cached in --out, so a rerun only streams. Writes summary.md and long_stream.json; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

from kyutai_stt.audio.decode import load_audio_file
from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.client import Client
from kyutai_stt.messages.events import Step
from kyutai_stt.engine.kyutai.reference import reference_outputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REAL_SPEECH, ServerProcess, diff, expected_from_outputs, word_tuples  # noqa: E402


def long_audio(source: np.ndarray, hours: float) -> np.ndarray:
    """The source over and over, each time with a different gain and a pause of 0.5-2 s (no two repeats alike)."""
    rng = np.random.default_rng(0)
    total = int(hours * 3600 * SAMPLE_RATE)
    out = np.zeros(total, np.float32)
    position = 0
    while position < total:
        piece = source * rng.uniform(0.5, 1.0)
        take = min(len(piece), total - position)
        out[position:position + take] = piece[:take]
        position += take + int(rng.uniform(0.5, 2.0) * SAMPLE_RATE)
    return out


async def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = load_audio_file(args.audio)
    audio = long_audio(source, args.hours)
    neighbour_clip = source[: int(args.neighbour_seconds * SAMPLE_RATE)]

    cache, cache_pauses = out / f"reference-{args.hours:g}h.json", out / f"reference-{args.hours:g}h-pauses.npy"
    model = load_model(args.model, "cpu", "float32")
    t = time.monotonic()
    if cache.exists() and cache_pauses.exists():
        want = [tuple(w) for w in json.loads(cache.read_text())]
        want_pauses = np.load(cache_pauses)
    else:
        outputs = reference_outputs(model, audio, args.flush_seconds, args.frames_per_step or None)  # the server's
        want = word_tuples(expected_from_outputs(model, outputs, len(audio) / SAMPLE_RATE))
        want_pauses = np.array([o.pauses or () for o in outputs], np.float32)
        cache.write_text(json.dumps(want))
        np.save(cache_pauses, want_pauses)
        del outputs
    want_neighbour = word_tuples(expected_from_outputs(model, reference_outputs(model, neighbour_clip,
                                                                                args.flush_seconds,
                                                                                args.frames_per_step or None),
                                                       len(neighbour_clip) / SAMPLE_RATE))
    reference_s = time.monotonic() - t
    del model
    print(f"reference: {len(want)} words over {args.hours:g} h ({reference_s:.0f} s)", flush=True)

    env = dict(KYUTAI_STT_MODEL=args.model, KYUTAI_STT_DEVICE="cpu", KYUTAI_STT_DTYPE="float32",
               KYUTAI_STT_SLOTS=str(args.slots), KYUTAI_STT_FLUSH_SECONDS=str(args.flush_seconds))
    if args.frames_per_step:
        env["KYUTAI_STT_FRAMES_PER_STEP"] = str(args.frames_per_step)
    server = ServerProcess(out / "server.log", env=env)
    rss: list[tuple[float, float]] = []  # (seconds since start, MiB)
    neighbours: list[dict] = []
    try:
        await asyncio.to_thread(server.wait_ready)
        start = time.monotonic()

        async def monitor():
            while True:
                value = server.rss()
                if value is not None:
                    rss.append((round(time.monotonic() - start, 1), round(value / 2**20, 1)))
                await asyncio.sleep(10)

        pauses: list[tuple[float, ...]] = []

        async def long_stream() -> list:
            events, last_print = [], time.monotonic()
            async for event in Client(server.url).stream(audio, steps=True):
                if not isinstance(event, Step):
                    events.append(event)
                    continue
                pauses.append(event.pause_probabilities or ())  # every step's VAD probabilities: the LM's state
                if time.monotonic() - last_print > 60:
                    last_print = time.monotonic()
                    done_s, elapsed = event.step_idx * 0.08, last_print - start
                    print(f"  {done_s / 3600:.2f} h of audio in {elapsed / 60:.1f} min "
                          f"({done_s / elapsed:.1f}x real time)", flush=True)
            return events

        async def neighbour_lane(done: asyncio.Event):
            while not done.is_set():
                events = [e async for e in Client(server.url).stream(neighbour_clip, realtime=True)]
                lost, wrong = diff(word_tuples(events), want_neighbour)
                neighbours.append({"lost": lost, "wrong": wrong, "words": len(want_neighbour)})
                await asyncio.sleep(1.0)

        done = asyncio.Event()
        watcher = asyncio.create_task(monitor())
        lane = asyncio.create_task(neighbour_lane(done))
        events = await long_stream()
        elapsed = time.monotonic() - start
        done.set()
        await lane
        watcher.cancel()
    finally:
        server.stop()

    got = word_tuples(events)
    lost, wrong = diff(got, want)
    got_pauses = np.array(pauses, np.float32)
    steps_match = got_pauses.shape == want_pauses.shape
    pause_error = first_off = None
    if steps_match and got_pauses.size:
        difference = np.abs(got_pauses - want_pauses).max(axis=1)
        pause_error = float(difference.max())
        off = np.nonzero(difference > 1e-4)[0]
        first_off = int(off[0]) if len(off) else None
        off_fraction = float(len(off) / len(difference))
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    warm = [m for s, m in rss if s >= 120] or [m for _, m in rss]
    report = {
        "config": vars(args), "started": time.strftime("%Y-%m-%d %H:%M"),
        "audio_hours": args.hours, "elapsed_s": round(elapsed, 1), "reference_s": round(reference_s, 1),
        "speed_x_real_time": round(args.hours * 3600 / elapsed, 2),
        "words_expected": len(want), "words_received": len(got), "lost": lost, "wrong": wrong,
        "steps_expected": len(want_pauses), "steps_received": len(got_pauses), "max_pause_probability_error": pause_error,
        "first_step_off_by_1e-4": first_off, "fraction_of_steps_off_by_1e-4": off_fraction if first_off is not None else 0.0,
        "first_difference": None if first is None else {"got": got[first], "want": want[first]},
        "last_word": got[-1] if got else None,
        "neighbour_streams": len(neighbours),
        "neighbour_lost": sum(n["lost"] for n in neighbours), "neighbour_wrong": sum(n["wrong"] for n in neighbours),
        "rss_mib": {"start": rss[0][1] if rss else None, "after_2_min": warm[0] if warm else None,
                    "end": rss[-1][1] if rss else None, "max": max((m for _, m in rss), default=None)},
        "rss_samples": rss,
    }
    # Words must be exact. VAD probabilities are reported, not required: batch size and frames per Mimi call
    # change float rounding, which can flip a near-tie Mimi code now and then (see BENCHMARKS.md).
    report["ok"] = (not (lost or wrong or report["neighbour_lost"] or report["neighbour_wrong"]) and bool(neighbours)
                    and steps_match)
    (out / "long_stream.json").write_text(json.dumps(report, indent=2))
    (out / "summary.md").write_text(summary(report))
    return report


def summary(r: dict) -> str:
    m = r["rss_mib"]
    return "\n".join([
        f"## One {r['audio_hours']:g}-hour stream ({r['started']})", "",
        f"Model `{r['config']['model']}`, {r['config']['slots']} slots, audio: `{r['config']['audio']}` repeated with "
        f"varying gain and pauses; a neighbour streams a {r['config']['neighbour_seconds']:g} s clip at real time "
        "throughout.", "",
        "| | |", "|---|---|",
        f"| result | **{'PASS' if r['ok'] else 'FAIL'}** |",
        f"| words expected / received | {r['words_expected']} / {r['words_received']} |",
        f"| lost / wrong words | **{r['lost']} / {r['wrong']}** |",
        f"| last word | {r['last_word']} |",
        f"| steps expected / received | {r['steps_expected']} / {r['steps_received']} |",
        f"| VAD probabilities: max difference; steps off by > 1e-4 (first) | {r['max_pause_probability_error']}; "
        f"{r['fraction_of_steps_off_by_1e-4']:.2%} ({r['first_step_off_by_1e-4']}) |",
        f"| neighbour streams / lost / wrong words | {r['neighbour_streams']} / {r['neighbour_lost']} / {r['neighbour_wrong']} |",
        f"| time for the stream | {r['elapsed_s'] / 60:.1f} min ({r['speed_x_real_time']}x real time) |",
        f"| server RSS start / after 2 min / end / max | {m['start']} / {m['after_2_min']} / {m['end']} / {m['max']} MiB |",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or HF repo id (CPU, float32)")
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--audio", default=str(REAL_SPEECH), help="speech file repeated to fill the hours "
                        "(default: tests/fixtures/bria.opus)")
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--neighbour-seconds", type=float, default=8.0)
    parser.add_argument("--flush-seconds", type=float, default=0.5)
    parser.add_argument("--frames-per-step", type=int, default=0, help="the server's (0: its auto rule)")
    parser.add_argument("--out", default="artifacts/long-stream")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
