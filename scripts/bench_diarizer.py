"""The streaming diarizer's capacity: time of one Sortformer step (a 0.48 s chunk of every stream, batched) for a
growing number of streams, and so how many streams one device keeps at real time (step time <= chunk length).

    uv run python scripts/bench_diarizer.py --model random:tiny --device cpu --streams 1,4,16
    python3 scripts/bench_diarizer.py --model random:full --device cuda --streams 1,16,64,128,256,512

``random:full`` is the real model's shape (~118 M parameters) with random weights (no hub needed: the time does
not depend on the weights); ``nvidia/diar_streaming_sortformer_4spk-v2`` loads the real one. Streams are warmed
past their speaker cache and FIFO fill-up (``--warm`` steps) so the timed steps run at the steady-state size.
Prints one table and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kyutai_stt.engine.diarization.sortformer import SortformerDiarizer, _Stream, load_sortformer  # noqa: E402


def bench(diarizer: SortformerDiarizer, streams: int, warm: int, steps: int, sync) -> float:
    """Median seconds of one step of ``streams`` streams (random audio), after ``warm`` steps."""
    rng = np.random.default_rng(streams)
    model = diarizer.model
    rows = [_Stream(sink=lambda events: None, window=np.zeros(diarizer.window_samples, np.float32),
                    state=model.sortformer_modules.init_streaming_state(1, async_streaming=True, device=model.device))
            for _ in range(streams)]
    times = []
    for i in range(warm + steps):
        for row in rows:
            chunk = rng.uniform(-0.3, 0.3, diarizer.chunk_samples).astype(np.float32)
            row.window = np.concatenate([row.window[diarizer.chunk_samples:], chunk])
        sync()
        start = time.perf_counter()
        diarizer.step(rows)
        sync()
        if i >= warm:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--warm", type=int, default=70, help="steps before timing (cache and FIFO fill: ~65 steps)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    torch.set_grad_enabled(False)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    diarizer = SortformerDiarizer(load_sortformer(args.model, args.device), name=args.model)
    chunk = diarizer.chunk_samples / 16000
    params = sum(p.numel() for p in diarizer.model.parameters())
    print(f"{args.model} ({params / 1e6:.1f} M parameters) on {args.device}; chunk {chunk:.2f} s; "
          f"threads {torch.get_num_threads()}")
    print("| streams | step (ms) | real-time factor (step / chunk) | keeps real time |")
    print("|---|---|---|---|")
    rows = []
    try:
        for streams in [int(s) for s in args.streams.split(",")]:
            step = bench(diarizer, streams, args.warm, args.steps, sync)
            rows.append({"streams": streams, "step_s": step, "rtf": step / chunk})
            print(f"| {streams} | {step * 1000:.1f} | {step / chunk:.3f} | {'yes' if step <= chunk else 'no'} |",
                  flush=True)
    finally:
        diarizer.stop()
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
