"""`bench.py engine`: the real Engine's step time against batch size, split into Mimi, LM and host.

The split comes from the engine's own ``StepTiming`` (``Engine.add_step_timing_listener``), which syncs the device
between the parts; ``--with-engine`` adds a run without that listener, the engine as it serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (BudgetOpt, DeviceOpt, DtypeOpt, GraphsOpt, ModelOpt, OutOpt, ThreadsOpt, audio_pool, err,
                     is_oom, load, machine_info, markdown_table, model_info, parse_ints, recover_from_oom,
                     setup_torch, stats_ms, warn_if_busy, write_json)
from .engine_run import run_engine, timing_summary
from .memory import measure_state_memory, mib


def engine(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch: str = typer.Option("1,2,4,8,16", help="Comma-separated batch sizes (slots)."),
    steps: int = typer.Option(100, min=1, help="Measured steps per batch size (p99 needs >= 100)."),
    warmup: int = typer.Option(5, min=0, help="Unmeasured steps first (CUDA graph capture, allocator)."),
    threads: Optional[int] = ThreadsOpt,
    cuda_graphs: bool = GraphsOpt,
    with_engine: bool = typer.Option(True, "--with-engine/--no-with-engine",
                                     help="Also time the Engine without the part breakdown (no device sync "
                                          "between parts) at each batch size: the Engine p50/p99 columns."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure per-stream streaming state."),
    budget_ms: float = BudgetOpt,
    out: Optional[Path] = OutOpt,
) -> None:
    """Engine step time against batch size, split into Mimi encode, LM step and host overhead."""
    setup_torch(threads, cuda_graphs)
    sizes = parse_ints(batch)
    machine = machine_info(device)
    warn_if_busy(machine)
    stt = load(model, device, dtype)
    pool = audio_pool()
    rows = []
    for b in sizes:
        err.print(f"engine: batch {b} ({warmup}+{steps} steps)")
        try:
            r = {"batch": b, **timing_summary(run_engine(stt, b, steps, warmup, pool, timing=True).timings)}
            if with_engine:
                run = run_engine(stt, b, steps, warmup, pool)
                r["engine_step_ms"] = stats_ms(run.step_s)
        except (RuntimeError, MemoryError) as exc:
            if not is_oom(exc):
                raise
            recover_from_oom(stt, b)
            err.print("  (larger batch sizes are skipped)")
            break
        p99 = r["step_ms"]["p99"]
        r["realtime_ok"] = p99 is not None and p99 <= budget_ms
        r["ms_per_stream_p50"] = round(r["step_ms"]["p50"] / b, 3)
        rows.append(r)
    ok = [r["batch"] for r in rows if r["realtime_ok"]]
    summary = {
        "budget_ms": budget_ms,
        "max_realtime_batch_measured": max(ok) if ok else 0,
        "note": "largest measured batch whose p99 step (Engine, timed part by part) is within the budget; "
                "use `capacity` for the exact figure with the real Engine",
    }
    mem = None
    if memory:
        mem = measure_state_memory(stt)
        mem["lm_mib_per_stream"] = mib(mem["lm_bytes_per_stream"])
        mem["mimi_mib_per_stream"] = mib(mem["mimi_bytes_per_stream"])
    headers = ["batch", "step p50 ms", "step p99 ms", "Mimi p50", "LM p50", "host p50", "ms/stream"]
    if with_engine:
        headers += ["Engine p50", "Engine p99"]
    headers += ["real time (p99 <= %g ms)" % budget_ms]
    table = []
    for r in rows:
        line = [r["batch"], r["step_ms"]["p50"], r["step_ms"]["p99"], r["mimi_ms"]["p50"], r["lm_ms"]["p50"],
                r["host_ms"]["p50"], r["ms_per_stream_p50"]]
        if with_engine:
            line += [r["engine_step_ms"]["p50"], r["engine_step_ms"]["p99"]]
        table.append(line + [r["realtime_ok"]])
    print(f"### Engine step time ({model_info(stt)['name']}, {stt.device}, {str(stt.dtype).removeprefix('torch.')})\n")
    print(markdown_table(headers, table))
    print(f"\nImplied max real-time streams (largest measured batch with p99 <= {budget_ms:g} ms): "
          f"{summary['max_realtime_batch_measured']}")
    if mem:
        print(f"Streaming state per stream: LM {mem['lm_mib_per_stream']} MiB, Mimi {mem['mimi_mib_per_stream']} MiB "
              f"({', '.join(f'{k} {mib(v)}' for k, v in mem['mimi_by_part'].items())})")
    write_json(out, {"command": "engine", "machine": machine,
                     "config": {"model": model_info(stt), "batch": sizes, "steps": steps, "warmup": warmup,
                                "threads": threads, "cuda_graphs": cuda_graphs, "with_engine": with_engine},
                     "results": rows, "summary": summary, "memory": mem})
