"""The per-step cost of the decoding hooks (issue 20): sampling and keyterms, with and without streams using them.

One engine, every slot streaming the same audio; the configurations run interleaved, in rounds, in one process, so
they share the machine's state. Step times come from the engine's step listener (the LM hooks run inside a step).

    uv run python scripts/bench_decoding.py --checkpoint /work/ckpt/tiny --slots 8 --seconds 4 --rounds 3
    # GPU (a 1b random checkpoint: `kyutai-stt make-checkpoint DIR --size 1b`):
    python3 scripts/bench_decoding.py --checkpoint DIR --device cuda --dtype bfloat16 --slots 64 --seconds 10

Configurations: ``no-hooks`` (LMGen without the two hooks: the engine as it was before them), ``greedy`` (no stream
uses the controls: the hooks return at once), ``sample-half`` (half the streams sample at 0.25), ``keyterms-half``
(half have 100 keyterms), ``both-all`` (every stream does both).
"""

from __future__ import annotations

import argparse
import statistics
import threading

import numpy as np

from kyutai_stt.engine.contract import DecodingOptions, StreamEnd, StreamFailed
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.engine import Engine, default_frames_per_step


def options_for(config: str, index: int, terms: tuple[str, ...]) -> DecodingOptions | None:
    half = index % 2 == 0
    if config == "sample-half" and half:
        return DecodingOptions(temperature=0.25, seed=index)
    if config == "keyterms-half" and half:
        return DecodingOptions(keyterms=terms)
    if config == "both-all":
        return DecodingOptions(temperature=0.25, seed=index, keyterms=terms)
    return None


def run(engine: Engine, pcm: np.ndarray, config: str, terms: tuple[str, ...]) -> list[float]:
    hooks = engine._decoding.on_text_logits, engine._decoding.on_text_token
    engine._lm_gen.on_text_logits_hook, engine._lm_gen.on_text_hook = (None, None) if config == "no-hooks" else hooks
    steps: list[float] = []
    done = [threading.Event() for _ in range(engine.batch_size)]
    recording = threading.Event()

    def sink_for(i):
        def sink(events):
            if any(isinstance(e, (StreamEnd, StreamFailed)) for e in events):
                done[i].set()
        return sink

    engine._step_listeners[:] = [lambda frames, seconds, streams: recording.is_set() and steps.append(seconds)]
    handles = [engine.open(sink_for(i), options=options_for(config, i, terms)) for i in range(engine.batch_size)]
    recording.set()
    for handle in handles:
        engine.push(handle, pcm)
        engine.close(handle)
    for event in done:
        event.wait(600)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    model = load_model(args.checkpoint, args.device, args.dtype)
    k = default_frames_per_step(model.device)
    engine = Engine(model, args.slots, frames_per_step=k, max_frames_per_step=k)  # steps of one size: comparable
    engine.warmup()
    engine.start()
    rng = np.random.default_rng(0)
    pcm = (0.1 * rng.standard_normal(int(args.seconds * 24000))).astype(np.float32)
    vocabulary = [model.tokenizer.id_to_piece(i).lstrip("▁") for i in range(4, model.lm.text_card)]
    terms = tuple(t for t in vocabulary if len(t) > 2)[:100]
    configs = ["no-hooks", "greedy", "sample-half", "keyterms-half", "both-all"]
    times: dict[str, list[float]] = {c: [] for c in configs}
    try:
        for _ in range(args.rounds):
            for config in configs:
                times[config] += run(engine, pcm, config, terms)
    finally:
        engine.stop()
    base = statistics.median(times["no-hooks"])
    print(f"{model.name}: {args.slots} slots, {args.device} {args.dtype}, {args.rounds} rounds of {args.seconds:g} s")
    print(f"{'configuration':<15} {'steps':>6} {'median ms':>10} {'mean ms':>9} {'vs no-hooks':>12}")
    for config in configs:
        values = times[config]
        median = statistics.median(values)
        print(f"{config:<15} {len(values):>6} {median * 1e3:>10.2f} {statistics.mean(values) * 1e3:>9.2f} "
              f"{(median / base - 1) * 100:>+11.1f}%")


if __name__ == "__main__":
    main()
