#!/usr/bin/env python
"""Benchmarks for kyutai-stt: engine step time, capacity, the seed-design baseline, end to end over WebSockets.

Every subcommand prints a markdown table on stdout (progress goes to stderr) and, with ``--out FILE``, writes the
same figures as JSON together with a description of the machine (CPU, GPU, torch, load average, git commit, date).
See BENCHMARKS.md for the commands behind each published figure and for the exact definitions.

    uv run python scripts/bench.py engine   --model CKPT --batch 1,2,4,8,16
    uv run python scripts/bench.py capacity --model CKPT
    uv run python scripts/bench.py seed     --model CKPT
    uv run python scripts/bench.py e2e      --model CKPT --clients 8

The real-time budget is one Mimi frame: 80 ms. A batch "keeps real time" when the p99 of its step time is within it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import typer
from rich.console import Console

FRAME_MS = 80.0
REPO = Path(__file__).resolve().parent.parent
err = Console(stderr=True)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kyutai-stt benchmarks (markdown table on stdout, JSON with --out).")


# ====================================================================================================== helpers
def now() -> float:
    return time.perf_counter()


def stats_ms(values_s: list[float] | np.ndarray, scale: float = 1000.0) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, max of durations given in seconds, reported in milliseconds."""
    a = np.asarray(values_s, dtype=np.float64) * scale
    if a.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "count": int(a.size),
        "mean": round(float(a.mean()), 3),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "max": round(float(a.max()), 3),
    }


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter("batch sizes must be positive integers")
    return values


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return None


def machine_info(device: str | None = None) -> dict:
    import torch

    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": git_commit(),
        "gpu": None,
    }
    with contextlib.suppress(Exception):
        import moshi

        info["moshi"] = getattr(moshi, "__version__", None)
    if device and device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda, "driver_cuda_graphs": os.environ.get("NO_CUDA_GRAPH", "") == ""}
    return info


def warn_if_busy(machine: dict) -> None:
    load = machine["loadavg_at_start"][0]
    cores = machine["cpu_count"] or 1
    if load > 0.25 * cores:
        err.print(f"[yellow]warning:[/yellow] load average {load:.2f} on {cores} cores: other work is running, "
                  "CPU figures will be noisy (do not publish them).")


def write_json(path: Optional[Path], payload: dict) -> None:
    if path is None:
        return
    payload = dict(payload)
    payload.setdefault("machine", {})["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    err.print(f"wrote {path}")


def setup_torch(threads: Optional[int], cuda_graphs: bool) -> None:
    """Thread count (CPU) and CUDA graphs switch; must run before the model is used."""
    import torch

    if not cuda_graphs:
        os.environ["NO_CUDA_GRAPH"] = "1"
    if threads:
        torch.set_num_threads(threads)


def load(model: str, device: str, dtype: str):
    from kyutai_stt.checkpoint import load_model

    if Path(model).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t = now()
    stt = load_model(model, device, dtype)
    err.print(f"loaded {model} on {stt.device} ({str(stt.dtype).removeprefix('torch.')}) in {now() - t:.1f} s")
    return stt


def model_info(stt) -> dict:
    lm = stt.lm
    layers = lm.transformer.layers
    return {
        "name": stt.name,
        "random_weights": stt.random_weights,
        "device": str(stt.device),
        "dtype": str(stt.dtype).removeprefix("torch."),
        "lm_params_m": round(sum(p.numel() for p in lm.parameters()) / 1e6, 2),
        "mimi_params_m": round(sum(p.numel() for p in stt.mimi.parameters()) / 1e6, 2),
        "lm_layers": len(layers),
        "lm_dim": lm.dim,
        "delay_frames": stt.delay_frames,
        "prefix_frames": stt.prefix_frames,
    }


def free_device_memory() -> None:
    """Between batch sizes: drop the previous streaming states (and CUDA graphs) before allocating new ones."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def audio_pool(count: int = 4, seconds: float = 8.0) -> list[np.ndarray]:
    """Distinct speech-like clips (the content barely changes the cost, but codes should vary like real audio)."""
    from kyutai_stt.testing_checkpoint import synthetic_sounds

    return [synthetic_sounds(seconds, 4242 + i) for i in range(count)]


def frames_of(pool: list[np.ndarray], slot: int, count: int) -> np.ndarray:
    """``count`` 80 ms frames for ``slot``: a pool clip, shifted per slot, looped."""
    from kyutai_stt.checkpoint import FRAME_SIZE

    clip = pool[slot % len(pool)]
    n = len(clip) // FRAME_SIZE
    frames = clip[: n * FRAME_SIZE].reshape(n, FRAME_SIZE)
    index = (np.arange(count) + slot * 7) % n
    return np.ascontiguousarray(frames[index])


# ------------------------------------------------------------------------------------------- memory accounting
def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        with contextlib.suppress(Exception):
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key in seen or key == 0:
                return 0
            seen.add(key)
            return storage.nbytes()
        return obj.numel() * obj.element_size()
    if is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name), seen) for f in fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    if type(obj).__name__.endswith("Cache"):  # moshi's RingKVCache is a plain class
        return sum(_tensor_bytes(x, seen) for x in vars(obj).values())
    return 0


def streaming_state_bytes(module) -> dict[str, int]:
    """Bytes of tensors held in moshi streaming states, per top-level child (e.g. encoder, decoder, transformer)."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for name, sub in module.named_modules():
        state = getattr(sub, "_streaming_state", None)
        if state is None:
            continue
        key = name.split(".")[0] or "(root)"
        out[key] = out.get(key, 0) + _tensor_bytes(state, seen)
    return out


def measure_state_memory(stt) -> dict:
    """Per-stream streaming state, measured: bytes at batch 2 minus bytes at batch 1, Mimi and LM separately."""
    import torch
    from moshi.models import LMGen

    def at(batch: int) -> tuple[dict, dict]:
        gen = LMGen(stt.lm, temp=0.0, temp_text=0.0)
        with stt.mimi.streaming(batch), gen.streaming(batch):
            # LMGen's modules include the LM itself: walking it counts the LM's KV caches once
            return streaming_state_bytes(stt.mimi), {"lm": sum(streaming_state_bytes(gen).values())}

    with torch.no_grad():
        m1, l1 = at(1)
        m2, l2 = at(2)
    mimi = {k: m2.get(k, 0) - m1.get(k, 0) for k in m2}
    return {
        "lm_bytes_per_stream": l2["lm"] - l1["lm"],
        "mimi_bytes_per_stream": sum(mimi.values()),
        "mimi_by_part": {k: v for k, v in mimi.items() if v},
    }


def formula_state_memory(config: dict, lm_dtype_bytes: int) -> dict:
    """Per-stream state from the checkpoint's config: LM ring KV cache and Mimi's transformer KV caches.

    LM: 2 (K and V) x layers x context x dim x bytes. Mimi (float32, moshi's fixed Mimi config): encoder and
    decoder transformers of 8 layers, d_model 512, context 250 each; ``mimi.streaming`` sets up both although
    STT only encodes. Convolution state buffers are small and not counted here (the measured figure has them).
    """
    from moshi.models.loaders import _transformer_kwargs

    lm = 2 * config["num_layers"] * config["context"] * config["dim"] * lm_dtype_bytes
    t = _transformer_kwargs
    mimi_one = 2 * t["num_layers"] * t["context"] * t["d_model"] * 4
    return {
        "lm_kv_bytes_per_stream": lm,
        "mimi_encoder_kv_bytes_per_stream": mimi_one,
        "mimi_decoder_kv_bytes_per_stream": mimi_one,
        "total_bytes_per_stream": lm + 2 * mimi_one,
    }


def dtype_bytes(dtype: str, device: str) -> int:
    if dtype in ("bfloat16", "bf16", "float16", "fp16"):
        return 2
    if dtype == "auto":
        return 2 if device.startswith("cuda") else 4
    return 4


def mib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**20, 2)


# ============================================================================================ the mirrored step
@dataclass
class StepTimes:
    total: float
    mimi: float
    lm: float
    plan: float  # gathering frames into the batch array (host)
    masks: float  # set_exec_mask on Mimi and the LM (host; many small modules)
    h2d: float  # masks and PCM to the device
    d2h: float  # tokens and VAD probabilities back to the host (one sync)
    deliver: float  # one StepOutput per slot

    @property
    def host(self) -> float:
        return self.total - self.mimi - self.lm


class MirroredEngineStep:
    """One full-batch engine step, timed part by part.

    Mirrors ``Engine._plan`` + ``Engine._execute`` (steady state: every slot has a frame, no reset) with a
    device synchronisation between the parts, so the Mimi and LM times are the device time of each call. The
    synchronisations themselves cost a little on GPU; the real engine has only the one at the token copy.
    """

    def __init__(self, stt, batch: int, frames: np.ndarray):
        import torch
        from moshi.models import LMGen

        self.stt, self.batch, self.frames = stt, batch, frames  # frames: [steps_available, batch, 1920]
        self.device = stt.device
        self.lm_gen = LMGen(stt.lm, temp=0.0, temp_text=0.0)
        self._stack = contextlib.ExitStack()
        self._index = 0
        self._torch = torch

    def __enter__(self) -> "MirroredEngineStep":
        torch = self._torch
        self._stack.enter_context(torch.no_grad())
        self._stack.enter_context(self.stt.mimi.streaming(self.batch))
        self._stack.enter_context(self.lm_gen.streaming(self.batch))
        # the engine's init step: the LM's first step ignores its input
        on = torch.ones(self.batch, dtype=torch.bool, device=self.device)
        zero = torch.zeros((self.batch, self.stt.mimi.num_codebooks, 1), dtype=torch.long, device=self.device)
        self.lm_gen.set_exec_mask(on)
        self.lm_gen.step_with_extra_heads(zero)
        sync(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def step(self) -> StepTimes:
        from kyutai_stt.checkpoint import FRAME_SIZE
        from kyutai_stt.engine import StepOutput

        torch = self._torch
        device = self.device
        B = self.batch
        t0 = now()
        # --- plan (Engine._plan): fresh arrays, per-slot frame copy
        audio = np.zeros(B, bool)
        pcm = np.zeros((B, FRAME_SIZE), np.float32)
        source = self.frames[self._index % len(self.frames)]
        for i in range(B):
            pcm[i] = source[i]
            audio[i] = True
        self._index += 1
        t1 = now()
        # --- masks and host-to-device (Engine._execute)
        lm_mask = torch.from_numpy(audio).to(device)
        mimi_mask = torch.from_numpy(audio).to(device)
        batch = torch.from_numpy(pcm).to(device, non_blocking=True)[:, None, :]
        sync(device)
        t2 = now()
        self.stt.mimi.set_exec_mask(mimi_mask)
        self.lm_gen.set_exec_mask(lm_mask)
        sync(device)
        t3 = now()
        codes = self.stt.mimi.encode(batch)
        sync(device)
        t4 = now()
        result = self.lm_gen.step_with_extra_heads(codes)
        sync(device)
        t5 = now()
        tokens_t, heads = result
        tokens = tokens_t[:, 0, 0].cpu().numpy()
        pauses = torch.stack([h[:, 0, 0] for h in heads], dim=1).float().cpu().numpy() if heads else None
        t6 = now()
        outs = [StepOutput(frame=self._index, token=int(tokens[i]),
                           pauses=tuple(float(p) for p in pauses[i]) if pauses is not None else None,
                           buffered_samples=0) for i in range(B)]
        del outs
        t7 = now()
        return StepTimes(total=t7 - t0, mimi=t4 - t3, lm=t5 - t4, plan=t1 - t0, masks=t3 - t2, h2d=t2 - t1,
                         d2h=t6 - t5, deliver=t7 - t6)


def time_mirrored(stt, batch: int, steps: int, warmup: int, pool: list[np.ndarray]) -> dict:
    frames = np.stack([frames_of(pool, slot, 64) for slot in range(batch)], axis=1)  # [64, B, 1920]
    times: list[StepTimes] = []
    with MirroredEngineStep(stt, batch, frames) as stepper:
        for i in range(warmup + steps):
            t = stepper.step()
            if i >= warmup:
                times.append(t)
    free_device_memory()
    part = lambda name: stats_ms([getattr(t, name) for t in times])  # noqa: E731
    return {
        "step_ms": part("total"),
        "mimi_ms": part("mimi"),
        "lm_ms": part("lm"),
        "host_ms": stats_ms([t.host for t in times]),
        "host_parts_ms_p50": {name: part(name)["p50"] for name in ("plan", "h2d", "masks", "d2h", "deliver")},
    }


# ============================================================================================ the real engine
@dataclass
class EngineRun:
    batch: int
    step_s: list[float]  # full-batch step times (Engine's own on_step measurement), warm-up dropped
    all_steps: int  # every step the worker ran in the measured window (partial ones too)
    wall_s: float
    frame_latency_s: list[float]  # realtime pace: push of a frame -> its StepOutput delivered
    max_backlog_frames: float


def run_engine(stt, batch: int, steps: int, warmup: int, pool: list[np.ndarray], pace: str = "backtoback",
               flush_seconds: float = 0.5, frames_per_step: int = 1) -> EngineRun:
    """Drive the real ``Engine`` through its public API with ``batch`` slots, all in use.

    backtoback: every stream has all its audio queued, so each step is a full batch (the engine's throughput).
    realtime: a feeder thread pushes each stream's next 80 ms frame when it would have been captured, stream i
    with a phase offset of i/batch frames (clients are not aligned), as real-time clients do.
    """
    from kyutai_stt.checkpoint import FRAME_SIZE
    from kyutai_stt.engine import Engine, StepOutput

    total_steps = warmup + steps
    total_frames = total_steps * frames_per_step
    step_times: list[float] = []
    counts = {"all": 0}
    enough = threading.Event()
    measuring = {"on": pace == "backtoback"}

    def on_step(active: int, seconds: float) -> None:
        if not measuring["on"]:
            return
        counts["all"] += 1
        # back to back: full batches only (the init steps are partial). Real time: every step, since a step
        # costs a full batch whatever the number of slots with a frame.
        if active == batch * frames_per_step or (pace == "realtime" and active > 0):
            step_times.append(seconds)
            if len(step_times) >= total_steps:
                enough.set()

    engine = Engine(stt, batch, flush_seconds=flush_seconds, frames_per_step=frames_per_step)
    engine.add_step_listener(on_step)
    engine.warmup(3)
    engine.start()
    push_times = np.zeros((batch, total_frames))
    deliver_times = np.full((batch, total_frames), np.nan)
    backlog = np.zeros((batch, total_frames))
    prefix = stt.prefix_frames

    def sink_for(i: int):
        def sink(events) -> None:
            t = now()
            for ev in events:
                if isinstance(ev, StepOutput):
                    k = ev.frame - prefix
                    if 0 <= k < total_frames:
                        deliver_times[i, k] = t
                        backlog[i, k] = ev.buffered_samples / FRAME_SIZE
        return sink

    handles = [engine.open(sink_for(i)) for i in range(batch)]
    data = [frames_of(pool, i, total_frames) for i in range(batch)]
    start = now()
    try:
        if pace == "backtoback":
            for i, h in enumerate(handles):
                engine.push(h, data[i].reshape(-1))
            if not enough.wait(timeout=max(120.0, total_frames * 10.0)):
                raise RuntimeError(f"batch {batch}: the engine did not run {total_frames} full steps in time")
        else:
            time.sleep(0.3)  # let the init steps pass
            start = now()
            measuring["on"] = True
            schedule = sorted((start + (k + 1 + i / batch) * FRAME_MS / 1000, i, k)
                              for k in range(total_frames) for i in range(batch))
            for due, i, k in schedule:
                delay = due - now()
                if delay > 0:
                    time.sleep(delay)
                engine.push(handles[i], data[i][k])
                push_times[i, k] = now()
            deadline = now() + 30 + total_frames * FRAME_MS / 1000
            while np.isnan(deliver_times).any() and now() < deadline:
                time.sleep(0.02)
            measuring["on"] = False
        wall = now() - start
    finally:
        for h in handles:
            engine.abort(h)
        engine.stop()
        del engine
        free_device_memory()
    if pace == "backtoback":
        measured = step_times[warmup:total_steps]
        latency: list[float] = []
        max_backlog = 0.0
    else:
        measured = step_times[warmup:]
        lat = (deliver_times - push_times)[:, warmup:]
        latency = [float(x) for x in lat[np.isfinite(lat)]]
        if np.isnan(deliver_times).any():
            latency.append(math.inf)  # frames never delivered: fails any latency bound
        max_backlog = float(backlog[:, warmup:].max())
    return EngineRun(batch, measured, counts["all"], wall, latency, max_backlog)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def recover_from_oom(stt, batch: int) -> None:
    import gc

    import torch

    # an allocation that failed while entering streaming mode leaves some modules streaming: clear them
    stt.mimi._stop_streaming()
    stt.lm._stop_streaming()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    err.print(f"  batch {batch}: out of memory")


def probe_engine(stt, batch: int, steps: int, warmup: int, pool, pace: str, budget_ms: float, percentile: float,
                 frames_per_step: int = 1) -> dict:
    budget_ms = budget_ms * frames_per_step  # a step carries frames_per_step x 80 ms of every stream's audio
    try:
        run = run_engine(stt, batch, steps, warmup, pool, pace, frames_per_step=frames_per_step)
    except (RuntimeError, MemoryError) as exc:
        if not is_oom(exc):
            raise
        recover_from_oom(stt, batch)
        return {"batch": batch, "pace": pace, "step_ms": stats_ms([]), f"step_p{percentile:g}_ms": None,
                "steps_per_second": None, "realtime_ok": False, "error": "out of memory"}
    step = stats_ms(run.step_s)
    p = float(np.percentile(np.asarray(run.step_s) * 1000, percentile)) if run.step_s else math.inf
    result = {"batch": batch, "pace": pace, "step_ms": step, f"step_p{percentile:g}_ms": round(p, 3),
              "steps_per_second": round(run.all_steps / run.wall_s, 2) if run.wall_s else None}
    ok = p <= budget_ms
    if pace == "realtime":
        finite = [x for x in run.frame_latency_s if math.isfinite(x)]
        result["frame_latency_ms"] = stats_ms(finite)
        result["frames_lost"] = len(run.frame_latency_s) - len(finite)
        result["max_backlog_frames"] = run.max_backlog_frames
        lat_p = float(np.percentile(np.asarray(run.frame_latency_s) * 1000, percentile)) if run.frame_latency_s else math.inf
        ok = ok and lat_p <= 2 * budget_ms
    result["realtime_ok"] = bool(ok)
    return result


def search_max(passes: Callable[[int], bool], start: int, maximum: int, resolution: int = 1) -> tuple[int, list[int]]:
    """Largest n in [start, maximum] with passes(n) (assumed monotone): doubling, then bisection. 0 if none."""
    tried: list[int] = []
    good, bad = 0, None
    n = start
    while n <= maximum:
        tried.append(n)
        if passes(n):
            good = n
            if n == maximum:
                break
            n = min(maximum, n * 2)
        else:
            bad = n
            break
    if good == 0:
        return 0, tried
    if bad is None:
        return good, tried
    while bad - good > resolution:
        mid = (good + bad) // 2
        tried.append(mid)
        if passes(mid):
            good = mid
        else:
            bad = mid
    return good, tried


# ============================================================================================ common options
ModelOpt = typer.Option(..., "--model", "-m", help="Checkpoint folder (kyutai-stt make-checkpoint DIR --size tiny|1b) or HF repo.")
DeviceOpt = typer.Option("cpu", help="cpu, cuda, cuda:N.")
DtypeOpt = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32.")
ThreadsOpt = typer.Option(None, help="torch.set_num_threads for this process (CPU). Default: torch's choice.")
GraphsOpt = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="moshi's CUDA graphs (GPU only).")
OutOpt = typer.Option(None, "--out", "-o", help="Write the results as JSON here.")
BudgetOpt = typer.Option(FRAME_MS, help="Real-time budget per step in ms (one frame).")


# ============================================================================================ engine
@app.command()
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
                                     help="Also time the real Engine (back-to-back full batches) at each batch size."),
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
            r = {"batch": b, **time_mirrored(stt, b, steps, warmup, pool)}
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
        "note": "largest measured batch whose p99 step (mirrored engine step) is within the budget; "
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


# ============================================================================================ capacity
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


@app.command()
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


# ============================================================================================ seed baseline
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
        from kyutai_stt.checkpoint import load_model

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


@app.command()
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


# ============================================================================================ end to end
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def gpu_bytes(pid: int) -> int | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            p, used = [x.strip() for x in line.split(",")]
            if int(p) == pid:
                return int(used) * 2**20
    return None


class Server:
    """``kyutai-stt serve`` in a subprocess (its own interpreter, as in production)."""

    def __init__(self, model: str, device: str, dtype: str, slots: int, threads: Optional[int], log_path: Path,
                 flush_seconds: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, KYUTAI_STT_FLUSH_SECONDS=str(flush_seconds), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
            env["MKL_NUM_THREADS"] = str(threads)
        self.log_path = log_path
        self._log = open(log_path, "w")
        cmd = [sys.executable, "-m", "kyutai_stt.cli", "serve", "--model", model, "--device", device,
               "--dtype", dtype, "--slots", str(slots), "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> dict:
        import httpx

        deadline = now() + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_path}")
            with contextlib.suppress(Exception):
                r = httpx.get(self.url + "/status", timeout=2)
                if r.status_code == 200:
                    return r.json()
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s; see {self.log_path}")

    def status(self) -> dict | None:
        import httpx

        with contextlib.suppress(Exception):
            return httpx.get(self.url + "/status", timeout=2).json()
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class MemorySampler(threading.Thread):
    def __init__(self, server: Server, slots: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.server, self.slots, self.interval = server, slots, interval
        self.stop_event = threading.Event()
        self.peak_rss = 0
        self.full_rss = 0  # max RSS seen while every slot was in use
        self.peak_gpu: int | None = None
        self.max_in_use = 0
        self.gpu = False

    def run(self) -> None:
        last_status = 0.0
        in_use = 0
        while not self.stop_event.is_set():
            rss = rss_bytes(self.server.proc.pid) or 0
            self.peak_rss = max(self.peak_rss, rss)
            if now() - last_status > 1.0:
                last_status = now()
                st = self.server.status()
                in_use = st.get("slots_in_use", 0) if st else in_use
                self.max_in_use = max(self.max_in_use, in_use)
                if self.gpu:
                    g = gpu_bytes(self.server.proc.pid)
                    if g is not None:
                        self.peak_gpu = max(self.peak_gpu or 0, g)
            if in_use >= self.slots:
                self.full_rss = max(self.full_rss, rss)
            self.stop_event.wait(self.interval)


@app.command()
def e2e(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    clients: int = typer.Option(8, min=1, help="Concurrent real-time clients."),
    slots: Optional[int] = typer.Option(None, help="Server slots (default: --clients)."),
    seconds: float = typer.Option(10.0, min=0.5, help="Audio per client, streamed at real time."),
    ramp: float = typer.Option(1.0, min=0.0, help="Clients start uniformly spread over this many seconds."),
    loadgen_procs: Optional[int] = typer.Option(None, help="Load-generator processes (default: one per 128 clients)."),
    server_threads: Optional[int] = typer.Option(None, help="OMP_NUM_THREADS for the server (CPU)."),
    slot_delta: bool = typer.Option(True, "--slot-delta/--no-slot-delta",
                                    help="Also start a 1-slot server to measure idle memory per slot."),
    flush_seconds: float = typer.Option(0.5, help="Server flush silence after the model delay."),
    startup_timeout: float = typer.Option(600.0),
    out: Optional[Path] = OutOpt,
    keep_logs: bool = typer.Option(False, help="Keep the server log (its path is printed)."),
) -> None:
    """End to end over WebSockets: N real-time Ogg/Opus clients from a separate process against `kyutai-stt serve`."""
    slots = slots or clients
    machine = machine_info(device)
    warn_if_busy(machine)
    config_path = Path(model) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    stt_cfg = (config or {}).get("stt_config", {})
    delay_frames = round(float(stt_cfg.get("audio_delay_seconds", 0.0)) * 12.5)
    prefix_frames = round(float(stt_cfg.get("audio_silence_prefix_seconds", 0.0)) * 12.5)
    logdir = Path(tempfile.mkdtemp(prefix="kyutai-stt-bench-"))
    memory: dict[str, Any] = {}
    if config:
        formula = formula_state_memory(config, dtype_bytes(dtype, device))
        memory["formula_per_stream_mib"] = {k.replace("_bytes", ""): mib(v) for k, v in formula.items()}

    server = Server(model, device, dtype, slots, server_threads, logdir / "server.log", flush_seconds)
    sampler = None
    try:
        err.print(f"e2e: starting the server with {slots} slots on port {server.port} (log {server.log_path})")
        server.wait_ready(startup_timeout)
        time.sleep(1.0)
        memory["idle_rss_mib"] = mib(rss_bytes(server.proc.pid))
        if device.startswith("cuda"):
            memory["idle_gpu_mib"] = mib(gpu_bytes(server.proc.pid))
        sampler = MemorySampler(server, slots)
        sampler.gpu = device.startswith("cuda")
        sampler.start()
        procs = loadgen_procs or max(1, math.ceil(clients / 128))
        shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        err.print(f"e2e: {clients} clients x {seconds:g} s of audio from {procs} load-generator process(es)")
        outs, gens, first = [], [], 0
        for i, share in enumerate(shares):
            path = logdir / f"loadgen-{i}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "loadgen", "--url", f"ws://127.0.0.1:{server.port}",
                   "--clients", str(share), "--first-client", str(first), "--seconds", str(seconds), "--ramp", str(ramp),
                   "--delay-frames", str(delay_frames), "--prefix-frames", str(prefix_frames), "--out", str(path)]
            gens.append(subprocess.Popen(cmd, cwd=REPO))
            outs.append(path)
            first += share
        timeout = 120 + ramp + seconds * 3 + clients * 0.5
        for g in gens:
            try:
                g.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                g.kill()
        sampler.stop_event.set()
        sampler.join(timeout=5)
        memory["peak_rss_mib"] = mib(sampler.peak_rss)
        memory["full_slots_rss_mib"] = mib(sampler.full_rss) if sampler.full_rss else None
        max_in_use = sampler.max_in_use
        if sampler.gpu:
            memory["peak_gpu_mib"] = mib(sampler.peak_gpu)
        status_after = server.status()
    finally:
        if sampler is not None:
            sampler.stop_event.set()
        server.stop()

    if slot_delta and slots > 1:
        err.print("e2e: starting a 1-slot server to measure idle memory per slot")
        one = Server(model, device, dtype, 1, server_threads, logdir / "server-1slot.log", flush_seconds)
        try:
            one.wait_ready(startup_timeout)
            time.sleep(1.0)
            rss1 = rss_bytes(one.proc.pid)
            memory["idle_rss_1slot_mib"] = mib(rss1)
            if memory.get("idle_rss_mib") is not None and rss1:
                memory["measured_rss_per_slot_mib"] = round((memory["idle_rss_mib"] - rss1 / 2**20) / (slots - 1), 2)
            if device.startswith("cuda"):
                g1 = gpu_bytes(one.proc.pid)
                if g1 is not None and memory.get("idle_gpu_mib") is not None:
                    memory["measured_gpu_per_slot_mib"] = round((memory["idle_gpu_mib"] - g1 / 2**20) / (slots - 1), 2)
        finally:
            one.stop()

    parts = [json.loads(p.read_text()) for p in outs if p.exists()]
    result = merge_loadgen(parts)
    result["clients"] = clients
    result["slots"] = slots
    result["server_status_after"] = status_after
    result["max_slots_in_use_seen"] = max_in_use  # from /status, polled every second
    result["memory"] = memory
    print(f"### End to end over WebSockets ({model}, {device}, {clients} real-time Opus clients, {slots} slots)\n")
    rows = [[name, result[k]["count"], result[k]["p50"], result[k]["p99"], result[k]["max"]]
            for name, k in (("word latency (system, excl. model delay)", "word_latency_ms"),
                            ("word latency incl. model delay", "word_latency_incl_delay_ms"),
                            ("frame latency (frame arrival -> its step event)", "frame_latency_ms"),
                            ("flush: end of stream -> `end` event", "flush_ms"),
                            ("flush: end of stream -> last word", "flush_last_word_ms"),
                            ("load generator send lateness", "send_lateness_ms"))]
    print(markdown_table(["measure", "count", "p50 ms", "p99 ms", "max ms"], rows))
    print(f"\nclients completed: {result['completed']}/{clients}, errors: {len(result['errors'])}, "
          f"words: {result['words']}, most slots in use at once: {max_in_use}")
    print()
    print(markdown_table(["memory", "MiB"], [[k, v] for k, v in memory.items() if not isinstance(v, dict)]
                         + [[f"per stream (config): {k}", v] for k, v in memory.get("formula_per_stream_mib", {}).items()]))
    write_json(out, {"command": "e2e", "machine": machine,
                     "config": {"model": model, "device": device, "dtype": dtype, "clients": clients, "slots": slots,
                                "seconds": seconds, "ramp": ramp, "delay_frames": delay_frames,
                                "prefix_frames": prefix_frames, "server_threads": server_threads,
                                "flush_seconds": flush_seconds},
                     "results": result,
                     "summary": {k: result[k]["p99"] for k in ("word_latency_ms", "flush_ms")}})
    if keep_logs:
        err.print(f"logs kept in {logdir}")
    else:
        for p in logdir.iterdir():
            p.unlink()
        logdir.rmdir()


def merge_loadgen(parts: list[dict]) -> dict:
    pooled: dict[str, list[float]] = {}
    completed, words, errors = 0, 0, []
    for part in parts:
        completed += part["completed"]
        words += part["words"]
        errors += part["errors"]
        for k, v in part["samples_s"].items():
            pooled.setdefault(k, []).extend(v)
    result: dict[str, Any] = {"completed": completed, "words": words, "errors": errors[:20]}
    for k in ("word_latency", "word_latency_incl_delay", "frame_latency", "flush", "flush_last_word", "send_lateness"):
        result[f"{k}_ms"] = stats_ms(pooled.get(k, []))
    return result


# ------------------------------------------------------------------------------------------------ load generator
@dataclass
class Clip:
    pages: list[bytes]
    ready_page: list[int]  # ready_page[a]: index of the page after which audio frame a is fully decodable


def make_clip(seconds: float, seed: int) -> Clip:
    from kyutai_stt.audio import OggOpusDecoder, encode_ogg_opus
    from kyutai_stt.checkpoint import FRAME_SIZE
    from kyutai_stt.testing_checkpoint import synthetic_sounds

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


@app.command(hidden=True)
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


if __name__ == "__main__":
    app()
