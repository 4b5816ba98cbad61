"""`bench.py capacity`: the largest number of streams the real Engine keeps in real time."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (BudgetOpt, DeviceOpt, DtypeOpt, GraphsOpt, ModelOpt, OutOpt, ThreadsOpt, audio_pool, err, load,
                     machine_info, markdown_table, model_info, search_max, setup_torch, warn_if_busy, write_json)
from .engine_run import probe_engine


def capacity_search(stt, pace: str, steps: int, warmup: int, start: int, maximum: int, resolution: int,
                    budget_ms: float, percentile: float, frames_per_step: int = 1) -> dict:
    pool = audio_pool()
    probes: dict[int, dict] = {}

    def passes(n: int) -> bool:
        err.print(f"capacity: probing {n} streams ({pace})")
        probes[n] = probe_engine(stt, n, steps, warmup, pool, pace, budget_ms, percentile, frames_per_step)
        r = probes[n]
        p = r[f"step_p{percentile:g}_ms"]
        if p is not None:
            err.print(f"  p{percentile:g} step {p:.1f} ms -> {'ok' if r['realtime_ok'] else 'too slow'}")
        return r["realtime_ok"]

    best, order = search_max(passes, start, maximum, resolution)
    return {"max_streams": best, "probes": [probes[n] for n in sorted(probes)], "probe_order": order,
            "pace": pace, "budget_ms": budget_ms, "percentile": percentile, "resolution": resolution,
            "frames_per_step": frames_per_step}


def capacity(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    pace: str = typer.Option("backtoback", help="backtoback: full batches queued (throughput). realtime: each stream "
                                                 "pushes a frame every 80 ms, phases spread."),
    steps: int = typer.Option(100, min=1, help="Measured full-batch steps per probe."),
    warmup: int = typer.Option(5, min=0),
    start: int = typer.Option(1, min=1, help="First batch size tried; then doubling, then bisection."),
    max_streams: int = typer.Option(4096, "--max", min=1),
    resolution: int = typer.Option(1, min=1, help="Stop bisecting when the bracket is this narrow."),
    percentile: float = typer.Option(99.0),
    threads: Optional[int] = ThreadsOpt,
    cuda_graphs: bool = GraphsOpt,
    budget_ms: float = BudgetOpt,
    frames_per_step: int = typer.Option(1, min=1, help="Frames per engine step (the step budget scales with it)."),
    out: Optional[Path] = OutOpt,
) -> None:
    """Largest number of concurrent streams whose every step finishes within 80 ms at p99 (real Engine)."""
    if pace not in ("backtoback", "realtime"):
        raise typer.BadParameter("--pace must be backtoback or realtime")
    setup_torch(threads, cuda_graphs)
    machine = machine_info(device)
    warn_if_busy(machine)
    stt = load(model, device, dtype)
    result = capacity_search(stt, pace, steps, warmup, start, max_streams, resolution, budget_ms, percentile,
                             frames_per_step)
    key = f"step_p{percentile:g}_ms"
    headers = ["streams", "step p50 ms", f"step p{percentile:g} ms", "steps/s"]
    if pace == "realtime":
        headers += ["frame latency p50 ms", "frame latency p99 ms"]
    headers += ["keeps real time"]
    rows = []
    for p in result["probes"]:
        row = [p["batch"], p["step_ms"]["p50"], p[key], p["steps_per_second"]]
        if pace == "realtime":
            lat = p.get("frame_latency_ms") or {}
            row += [lat.get("p50"), lat.get("p99")]
        rows.append(row + [p["realtime_ok"]])
    print(f"### Capacity ({stt.name}, {stt.device}, {str(stt.dtype).removeprefix('torch.')}, pace {pace})\n")
    print(markdown_table(headers, rows))
    print(f"\n**Max real-time streams: {result['max_streams']}** (p{percentile:g} step <= "
          f"{budget_ms * frames_per_step:g} ms for {frames_per_step} frame(s) per step"
          + (", p99 frame latency <= 2x budget" if pace == "realtime" else "") + ")")
    write_json(out, {"command": "capacity", "machine": machine,
                     "config": {"model": model_info(stt), "steps": steps, "warmup": warmup, "threads": threads,
                                "cuda_graphs": cuda_graphs},
                     "results": result, "summary": {"max_streams": result["max_streams"]}})
