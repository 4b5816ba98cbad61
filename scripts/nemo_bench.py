"""Capacity of the NVIDIA family: engine step time per batch size, and the streams that keep real time.

Each engine step advances every slot by one chunk (lookahead + 1 frames of 80 ms): features, the cache-aware encoder
step and CTC labels for the whole batch, exactly what the server runs. A batch of S slots keeps real time while a
step takes less than the chunk's duration; the largest such S is the "streams at real time" figure.

CPU (tiny random-weight model):   uv run python scripts/nemo_bench.py --size tiny --slots 1,8,32,64
GPU (0.6B-size random weights):   python3 scripts/nemo_bench.py --size 0.6b --device cuda --slots 64,128,256,512
(or --checkpoint nvidia/nemotron-speech-streaming-en-0.6b / a .nemo file for a real model). --json writes the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a .nemo file, folder or hub id (default: make a random one)")
    parser.add_argument("--size", default="tiny", help="random checkpoint size: tiny or 0.6b")
    parser.add_argument("--head", default="ctc", help="random checkpoint head: ctc or rnnt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slots", default="1,8,32")
    parser.add_argument("--lookahead", type=int, default=None, help="encoder frames of right context per chunk")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from kyutai_stt.engine.nemo.checkpoint import load_model, make_checkpoint
    from kyutai_stt.engine.nemo.engine import Engine
    from kyutai_stt.engine.nemo.features import FRAME_24K, LOOKAHEAD_24K

    checkpoint = args.checkpoint or str(make_checkpoint(tempfile.mkdtemp(), args.size, head=args.head))
    model = load_model(checkpoint, args.device, "float32", args.lookahead)
    chunk_seconds = (model.lookahead + 1) * 0.08
    rows = []
    print(f"{checkpoint} on {args.device}, chunk {chunk_seconds * 1000:.0f} ms, {torch.get_num_threads()} threads")
    print(f"{'slots':>6} {'step ms':>9} {'steps/s':>8} {'RTF':>6} {'real time':>9}")
    for slots in (int(s) for s in args.slots.split(",")):
        engine = Engine(model, slots)
        engine.warmup()
        pcm = torch.randn(slots, (model.lookahead + 1) * FRAME_24K + LOOKAHEAD_24K) * 0.1
        active = torch.ones(slots, dtype=torch.bool)
        deliver = np.full(slots, model.lookahead + 1)
        for _ in range(3):
            engine.step_tokens(pcm, active, deliver)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step_tokens(pcm, active, deliver)  # ends with the labels on the host: a device sync
        step = (time.perf_counter() - start) / args.steps
        row = {"slots": slots, "step_ms": step * 1000, "steps_per_s": 1 / step, "rtf": step / chunk_seconds,
               "real_time": step < chunk_seconds}
        rows.append(row)
        print(f"{slots:>6} {row['step_ms']:>9.1f} {row['steps_per_s']:>8.1f} {row['rtf']:>6.3f} "
              f"{'yes' if row['real_time'] else 'no':>9}")
    best = max((r["slots"] for r in rows if r["real_time"]), default=0)
    print(f"streams at real time: {best} (largest tested batch whose step is shorter than its chunk)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": checkpoint, "device": args.device, "chunk_seconds": chunk_seconds,
                       "rows": rows, "streams_at_real_time": best}, f, indent=1)


if __name__ == "__main__":
    main()
