"""`bench.py seed`: the seed design (one stream per model at batch 1) against the batched engine."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from .capacity import capacity_search
from .common import (FRAME_MS, BudgetOpt, DeviceOpt, DtypeOpt, GraphsOpt, ModelOpt, OutOpt, audio_pool, err,
                     frames_of, load, machine_info, markdown_table, now, search_max, setup_torch, stats_ms, sync,
                     warn_if_busy, write_json)


def seed_loop(stt, frames: np.ndarray, steps: int, warmup: int, realtime: bool,
              barrier: Any = None) -> dict:
    """The seed's design (Modal example): one stream, one model, batch 1, two `.item()` host syncs per step."""
    import torch
    from moshi.models import LMGen

    lm_gen = LMGen(stt.lm, temp=0, temp_text=0)
    step_s: list[float] = []
    late_s: list[float] = []
    pieces = 0
    with torch.no_grad(), stt.mimi.streaming(1), lm_gen.streaming(1):
        def one(frame: np.ndarray) -> None:
            nonlocal pieces
            chunk = torch.from_numpy(frame)[None, None].to(device=stt.device)
            codes = stt.mimi.encode(chunk)
            for c in range(codes.shape[-1]):
                text_tokens, vad_heads = lm_gen.step_with_extra_heads(codes[:, :, c:c + 1])
                if vad_heads:
                    _ = vad_heads[2][0, 0, 0].cpu().item()
                token = text_tokens[0, 0, 0].item()
                if token not in (0, 3):
                    stt.tokenizer.id_to_piece(token).replace("▁", " ")
                    pieces += 1

        for i in range(warmup):
            one(frames[i % len(frames)])
        sync(stt.device)
        if barrier is not None:
            barrier.wait()
        t0 = now()
        for k in range(steps):
            if realtime:
                due = t0 + k * FRAME_MS / 1000
                delay = due - now()
                if delay > 0:
                    time.sleep(delay)
                late_s.append(max(0.0, now() - due))
            t = now()
            one(frames[(warmup + k) % len(frames)])
            step_s.append(now() - t)
    return {"step_s": step_s, "late_s": late_s, "wall_s": now() - t0}


def _seed_instance(model: str, device: str, dtype: str, threads: int, steps: int, warmup: int, index: int,
                   barrier, queue) -> None:
    """One independent seed-style instance in its own process (its own model, like one container)."""
    try:
        import torch

        torch.set_num_threads(threads)
        from kyutai_stt.engine.kyutai.checkpoint import load_model

        stt = load_model(model, device, dtype)
        frames = frames_of(audio_pool(1, 8.0), index, 100)
        res = seed_loop(stt, frames, steps, warmup, realtime=True, barrier=barrier)
        queue.put((index, res, None))
    except BaseException as exc:  # report, never hang the parent
        with contextlib.suppress(Exception):
            barrier.abort()
        queue.put((index, None, f"{type(exc).__name__}: {exc}"))


def run_seed_instances(model: str, device: str, dtype: str, n: int, threads: int, steps: int, warmup: int,
                       budget_ms: float, percentile: float) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_seed_instance, args=(model, device, dtype, threads, steps, warmup, i, barrier, queue),
                         daemon=True) for i in range(n)]
    for p in procs:
        p.start()
    results, errors = [], []
    deadline = now() + 300 + steps * 2.0
    while len(results) + len(errors) < n and now() < deadline:
        with contextlib.suppress(Exception):
            index, res, error = queue.get(timeout=1.0)
            (errors.append(error) if error else results.append(res))
        if all(not p.is_alive() for p in procs) and queue.empty() and len(results) + len(errors) < n:
            errors.append("an instance exited without reporting")
            break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    steps_all = [s for r in results for s in r["step_s"]]
    late_all = [s for r in results for s in r["late_s"]]
    p = float(np.percentile(np.asarray(steps_all) * 1000, percentile)) if steps_all else math.inf
    final_late = max((r["late_s"][-1] for r in results if r["late_s"]), default=math.inf)
    ok = not errors and len(results) == n and p <= budget_ms and final_late * 1000 <= budget_ms
    return {"instances": n, "threads_per_instance": threads, "step_ms": stats_ms(steps_all),
            f"step_p{percentile:g}_ms": round(p, 3), "lateness_ms": stats_ms(late_all),
            "final_lateness_ms": round(final_late * 1000, 3) if math.isfinite(final_late) else None,
            "errors": errors, "realtime_ok": bool(ok)}


def seed(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    method: str = typer.Option("both", help="steptime: 80 ms / p99 of one batch-1 instance (time-sharing estimate). "
                                             "instances: N real instances (processes) at real-time pace, measured. both."),
    steps: int = typer.Option(100, min=1),
    warmup: int = typer.Option(5, min=0),
    max_instances: int = typer.Option(16, min=1, help="Upper bound of the instances search."),
    threads: Optional[int] = typer.Option(None, help="Threads per instance. Default: cores // instances (>= 1)."),
    ours: Optional[int] = typer.Option(None, help="Our max real-time streams, if already measured (skips the capacity search)."),
    ours_json: Optional[Path] = typer.Option(None, help="A `capacity --out` JSON to take our figure from."),
    capacity_steps: int = typer.Option(100, min=1, help="Steps per probe of the capacity search (when it runs)."),
    frames_per_step: int = typer.Option(1, min=1, help="Our engine's frames per step in the capacity search."),
    percentile: float = typer.Option(99.0),
    cuda_graphs: bool = GraphsOpt,
    budget_ms: float = BudgetOpt,
    out: Optional[Path] = OutOpt,
) -> None:
    """The seed design's real-time streams (one stream per model at batch 1) and our ratio to it."""
    if method not in ("steptime", "instances", "both"):
        raise typer.BadParameter("--method must be steptime, instances or both")
    setup_torch(threads, cuda_graphs)
    machine = machine_info(device)
    warn_if_busy(machine)
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {"budget_ms": budget_ms, "percentile": percentile}
    stt = None
    key = f"step_p{percentile:g}_ms"

    if method in ("steptime", "both"):
        stt = load(model, device, dtype)
        err.print(f"seed: one batch-1 instance, back to back ({warmup}+{steps} steps)")
        res = seed_loop(stt, frames_of(audio_pool(1, 8.0), 0, 100), steps, warmup, realtime=False)
        p = float(np.percentile(np.asarray(res["step_s"]) * 1000, percentile))
        result["steptime"] = {"step_ms": stats_ms(res["step_s"]), key: round(p, 3),
                              "streams": int(budget_ms // p) if p > 0 else 0,
                              "note": "budget / p99 of one instance alone: assumes N instances share the device "
                                      "with no contention (an upper bound for the seed design)"}
    if method in ("instances", "both"):
        probes: dict[int, dict] = {}

        def passes(n: int) -> bool:
            t = threads or max(1, cores // n)
            err.print(f"seed: {n} independent instance(s), {t} thread(s) each, real-time pace")
            probes[n] = run_seed_instances(model, device, dtype, n, t, steps, warmup, budget_ms, percentile)
            r = probes[n]
            err.print(f"  p{percentile:g} step {r[key]:.1f} ms, final lateness {r['final_lateness_ms']} ms -> "
                      f"{'ok' if r['realtime_ok'] else 'too slow'}{' ' + str(r['errors']) if r['errors'] else ''}")
            return r["realtime_ok"]

        best, order = search_max(passes, 1, max_instances)
        result["instances"] = {"streams": best, "probes": [probes[n] for n in sorted(probes)], "probe_order": order}

    # ours
    ours_source = "given"
    if ours is None and ours_json is not None:
        data = json.loads(ours_json.read_text())
        ours = int(data["summary"]["max_streams"])
        ours_source = str(ours_json)
    if ours is None:
        stt = stt or load(model, device, dtype)
        cap = capacity_search(stt, "backtoback", capacity_steps, warmup, 1, 4096, 1, budget_ms, percentile,
                              frames_per_step)
        ours = cap["max_streams"]
        ours_source = "capacity search (backtoback) in this run"
        result["capacity"] = cap
    result["ours"] = {"streams": ours, "source": ours_source}
    seed_streams = {m: result[m]["streams"] for m in ("steptime", "instances") if m in result}
    result["ratio"] = {m: (round(ours / s, 2) if s else None) for m, s in seed_streams.items()}

    print(f"### Seed design vs batched engine ({model}, {device})\n")
    rows = []
    if "steptime" in result:
        r = result["steptime"]
        rows.append(["seed, step-time estimate (80 ms / p99 of one instance)", r["step_ms"]["p50"], r[key],
                     r["streams"], result["ratio"]["steptime"]])
    if "instances" in result:
        best = result["instances"]["streams"]
        probe = next((p for p in result["instances"]["probes"] if p["instances"] == best), None)
        rows.append([f"seed, {best} independent instance(s) measured", probe["step_ms"]["p50"] if probe else None,
                     probe[key] if probe else None, best, result["ratio"]["instances"]])
    rows.append(["ours: one batched engine", None, None, ours, None])
    print(markdown_table(["design", "step p50 ms", f"step p{percentile:g} ms", "real-time streams", "ours / seed"], rows))
    if "instances" in result:
        print()
        print(markdown_table(["instances", "threads each", "step p50 ms", f"step p{percentile:g} ms",
                              "final lateness ms", "keeps real time"],
                             [[p["instances"], p["threads_per_instance"], p["step_ms"]["p50"], p[key],
                               p["final_lateness_ms"], p["realtime_ok"]] for p in result["instances"]["probes"]]))
    write_json(out, {"command": "seed", "machine": machine,
                     "config": {"model": model, "device": device, "dtype": dtype, "method": method, "steps": steps,
                                "warmup": warmup, "threads": threads},
                     "results": result, "summary": {"ours": ours, "seed": seed_streams, "ratio": result["ratio"]}})
