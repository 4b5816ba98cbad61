"""The GPU check of "exact whatever the load": parity with the batch-1 reference and capacity, mode on and off.

One prepared script for a scarce GPU (issue 13). For each checkpoint (tiny, 1b architecture; random weights),
dtype (bfloat16, float32) and slot count (1, 64, 256) it runs real-speech streams (cuts of tests/fixtures/bria.opus)
that join and pause at random through the engine and compares every token and every VAD pause probability with the
single-stream reference loop on the same device, in batch-invariant mode (``KYUTAI_STT_BATCH_INVARIANT=on``) and,
for bfloat16 at 64 slots, with it off (what the issue measured). Then it times full-batch engine steps with the mode
on and off (the capacity cost). Results go to OUT/gpu_check.json as they come; one table is printed last.

Full run on an H200 (about 8 minutes; the 1b checkpoint takes ~40 s to make, pass --checkpoint 1b=DIR to reuse one):
    python3 scripts/gpu_check.py --out /tmp/gpu_check
On the CPU, small sizes (the smoke test runs this):
    python3 scripts/gpu_check.py --quick --device cpu --checkpoint tiny=/path/to/tiny --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kyutai_stt.audio.decode import load_audio_file
from kyutai_stt.audio.constants import FRAME_SIZE
from kyutai_stt.engine.contract import DecodingOptions
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.engine import Engine, StreamEnd
from kyutai_stt.engine.kyutai.reference import reference_outputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REAL_SPEECH, Feeder, run_feeders, speech_cuts  # noqa: E402

FLUSH_SECONDS = 0.5


@dataclass
class Parity:
    checkpoint: str
    dtype: str
    slots: int
    mode: str
    streams: int
    streams_exact: int = 0
    tokens: int = 0
    tokens_differing: int = 0
    pauses_differing_steps: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Capacity:
    checkpoint: str
    dtype: str
    slots: int
    mode: str
    step_ms_p50: float = 0.0
    step_ms_p99: float = 0.0
    error: str | None = None


@dataclass
class Report:
    device: str
    torch: str
    started: float = field(default_factory=time.time)
    parity: list[Parity] = field(default_factory=list)
    capacity: list[Capacity] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def save(self, out: Path) -> None:
        (out / "gpu_check.json").write_text(json.dumps(asdict(self), indent=2))


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_parity(model, reference_model, name: str, dtype: str, slots: int, mode: str, clips, references,
               pace: float, deadline: Deadline, seed: int, options=None) -> Parity:
    result = Parity(name, dtype, slots, mode, len(clips))
    start = time.perf_counter()
    engine = Engine(model, slots, flush_seconds=FLUSH_SECONDS, frames_per_step=1, batch_invariant_mode=mode)
    engine.start()
    try:
        feeders = [Feeder(engine, clip, seed + i, pause=(0.25, 0.3 * pace), join_within=2.0 * pace,
                          options=options[i] if options else None)
                   for i, clip in enumerate(clips)]
        run_feeders(feeders, timeout=max(1.0, deadline.left()))
    finally:
        engine.stop()
    for f, want in zip(feeders, references):
        got_tokens = [o.token for o in f.outputs]
        want_tokens = [o.token for o in want]
        differing = sum(a != b for a, b in zip(got_tokens, want_tokens)) + abs(len(got_tokens) - len(want_tokens))
        pauses = sum(a.pauses != b.pauses for a, b in zip(f.outputs, want))
        result.tokens += len(want_tokens)
        result.tokens_differing += differing
        result.pauses_differing_steps += pauses
        result.streams_exact += int(differing == 0 and isinstance(f.end, StreamEnd))
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def run_capacity(model, name: str, dtype: str, slots: int, mode: str, steps: int) -> Capacity:
    """Full-batch steps on silence: every slot steps one frame, the engine's own _execute path."""
    from kyutai_stt.engine.kyutai.engine import _StepPlan

    engine = Engine(model, slots, flush_seconds=FLUSH_SECONDS, frames_per_step=1, batch_invariant_mode=mode)
    try:
        engine.warmup(3)
        n = slots
        plan = _StepPlan(reset=np.zeros(n, bool), init=np.zeros(n, bool), audio=np.ones(n, bool),
                         pcm=np.zeros((n, FRAME_SIZE), np.float32), deliver=np.zeros(n, int),
                         context_reset=np.zeros(n, bool), targets={})
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine._execute(plan)
            times.append(time.perf_counter() - t0)
    finally:
        engine.stop()
    times = np.array(times[len(times) // 5:]) * 1000  # the first fifth is warm-up
    return Capacity(name, dtype, slots, mode, round(float(np.percentile(times, 50)), 2),
                    round(float(np.percentile(times, 99)), 2))


def ensure_checkpoint(name: str, given: dict[str, str], workdir: Path) -> Path:
    if name in given:
        folder = Path(given[name])
        if (folder / "config.json").exists():
            return folder
    else:
        folder = workdir / f"ckpt-{name}"
    if not (folder / "config.json").exists():
        from kyutai_stt.engine.kyutai.testing_checkpoint import make_checkpoint  # what `kyutai-stt make-checkpoint` runs

        started = time.perf_counter()
        make_checkpoint(folder, name)
        print(f"made the {name} checkpoint in {time.perf_counter() - started:.0f} s: {folder}", flush=True)
    return folder


def table(report: Report) -> str:
    lines = ["| checkpoint | dtype | slots | batch-invariant | streams exact | tokens differing | pause steps differing |",
             "|---|---|---:|---|---:|---:|---:|"]
    for p in report.parity:
        if p.error:
            lines.append(f"| {p.checkpoint} | {p.dtype} | {p.slots} | {p.mode} | error: {p.error} | | |")
        else:
            lines.append(f"| {p.checkpoint} | {p.dtype} | {p.slots} | {p.mode} | {p.streams_exact} / {p.streams} "
                         f"| {p.tokens_differing} / {p.tokens} | {p.pauses_differing_steps} |")
    lines += ["", "| checkpoint | dtype | slots | batch-invariant | step p50 ms | step p99 ms |", "|---|---|---:|---|---:|---:|"]
    for c in report.capacity:
        lines.append(f"| {c.checkpoint} | {c.dtype} | {c.slots} | {c.mode} | "
                     + (f"error: {c.error} | |" if c.error else f"{c.step_ms_p50} | {c.step_ms_p99} |"))
    by_key = {(c.checkpoint, c.dtype, c.slots, c.mode): c for c in report.capacity if not c.error}
    for (ck, dt, sl, mode), c in by_key.items():
        off = by_key.get((ck, dt, sl, "off"))
        if mode == "on" and off and off.step_ms_p50:
            cost = 1 - off.step_ms_p50 / c.step_ms_p50
            lines.append(f"capacity cost of the mode, {ck} {dt} {sl} slots: {cost:.1%} (p50 step time)")
    if report.skipped:
        lines.append("skipped (deadline): " + "; ".join(report.skipped))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json (created)")
    parser.add_argument("--audio", type=Path, default=REAL_SPEECH, help="real speech (default: tests/fixtures/bria.opus)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="reuse a checkpoint folder (tiny=DIR, 1b=DIR); missing ones are made in --out")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="parity with sampling: stream i samples at this temperature with seed 1000 + i, its "
                             "reference too (0: greedy, the default)")
    parser.add_argument("--deadline-s", type=float, default=480, help="global deadline; phases past it are skipped")
    args = parser.parse_args(argv)

    deadline = Deadline(args.deadline_s)
    args.out.mkdir(parents=True, exist_ok=True)
    given = dict(item.split("=", 1) for item in args.checkpoint)
    audio = load_audio_file(args.audio)
    if args.quick:
        names, dtypes, slot_counts, streams, seconds, cap_slots, cap_steps, pace = (
            ["tiny"], ["float32"], [2], 2, (0.4, 0.8), [2], 4, 0.1)
    else:
        names, dtypes, slot_counts, streams, seconds, cap_slots, cap_steps, pace = (
            ["tiny", "1b"], ["bfloat16", "float32"], [1, 64, 256], 16, (3.0, 6.0), [256, 512], 60, 1.0)
    report = Report(args.device, torch.__version__)
    clips = speech_cuts([audio], streams, seconds, random.Random(13))
    # with sampling, a stream's draws depend on its seed and step only: the reference with the same seed is exact
    options = ([DecodingOptions(temperature=args.temperature, seed=1000 + i).check() for i in range(len(clips))]
               if args.temperature > 0 else None)

    for name in names:
        if deadline.left() < 30:
            report.skipped.append(f"{name}: all")
            continue
        folder = ensure_checkpoint(name, given, args.out)
        for dtype in dtypes:
            model = load_model(str(folder), args.device, dtype)
            reference_model = load_model(str(folder), args.device, dtype)
            modes = ["on"] + (["off"] if dtype == dtypes[0] else [])
            for mode in modes:
                references = [reference_outputs(reference_model, clip, FLUSH_SECONDS, 1, batch_invariant_mode=mode,
                                                options=options[i] if options else None)  # 1 frame/step
                              for i, clip in enumerate(clips)]
                slots_here = slot_counts if mode == "on" else [s for s in slot_counts if s > 1][:1]
                for slots in slots_here:
                    if deadline.left() < 20:
                        report.skipped.append(f"parity {name} {dtype} {slots} {mode}")
                        continue
                    try:
                        result = run_parity(model, reference_model, name, dtype, slots, mode, clips, references,
                                            pace if slots > 1 else pace * 0.3, deadline, seed=100 + slots,
                                            options=options)
                    except Exception as exc:  # keep going: the table says what failed
                        result = Parity(name, dtype, slots, mode, len(clips), error=f"{type(exc).__name__}: {exc}")
                    report.parity.append(result)
                    report.save(args.out)
                    print(result, flush=True)
            if dtype == dtypes[0]:
                for slots in cap_slots:
                    for mode in ("on", "off"):
                        if deadline.left() < 20:
                            report.skipped.append(f"capacity {name} {dtype} {slots} {mode}")
                            continue
                        try:
                            capacity = run_capacity(model, name, dtype, slots, mode, cap_steps)
                        except Exception as exc:
                            capacity = Capacity(name, dtype, slots, mode, error=f"{type(exc).__name__}: {exc}")
                        report.capacity.append(capacity)
                        report.save(args.out)
                        print(capacity, flush=True)
            del model, reference_model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    report.save(args.out)
    print(table(report))
    (args.out / "gpu_check.md").write_text(table(report) + "\n")
    exact = all(p.error is None and p.tokens_differing == 0 for p in report.parity if p.mode == "on")
    return 0 if exact and report.parity else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
