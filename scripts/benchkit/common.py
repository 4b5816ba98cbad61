"""Helpers shared by the benchmark subcommands: statistics, markdown, machine description, JSON, options."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import typer
from rich.console import Console

FRAME_MS = 80.0
REPO = Path(__file__).resolve().parent.parent.parent
err = Console(stderr=True)

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
    from kyutai_stt.engine.kyutai.checkpoint import load_model

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
    from kyutai_stt.engine.kyutai.testing_checkpoint import synthetic_sounds

    return [synthetic_sounds(seconds, 4242 + i) for i in range(count)]


def frames_of(pool: list[np.ndarray], slot: int, count: int) -> np.ndarray:
    """``count`` 80 ms frames for ``slot``: a pool clip, shifted per slot, looped."""
    from kyutai_stt.audio.constants import FRAME_SIZE

    clip = pool[slot % len(pool)]
    n = len(clip) // FRAME_SIZE
    frames = clip[: n * FRAME_SIZE].reshape(n, FRAME_SIZE)
    index = (np.arange(count) + slot * 7) % n
    return np.ascontiguousarray(frames[index])


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
