"""`bench.py e2e`: real-time Ogg/Opus WebSocket clients, in separate processes, against `kyutai-stt serve`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import typer
from harness import ServerProcess, gpu_mib_by_pid, model_timing, rss_bytes  # scripts/harness.py (on the path)

from .common import (REPO, DeviceOpt, DtypeOpt, ModelOpt, OutOpt, err, machine_info, markdown_table, now, stats_ms,
                     warn_if_busy, write_json)
from .memory import dtype_bytes, formula_state_memory, mib

BENCH_SCRIPT = REPO / "scripts" / "bench.py"  # runs the `loadgen` subcommand in each load-generator process


def gpu_bytes(pid: int) -> int | None:
    mib_used = gpu_mib_by_pid().get(pid)
    return None if mib_used is None else mib_used * 2**20


def start_server(model: str, device: str, dtype: str, slots: int, threads: Optional[int], log_path: Path,
                 flush_seconds: float) -> ServerProcess:
    env = {"KYUTAI_STT_FLUSH_SECONDS": str(flush_seconds), "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return ServerProcess(log_path, ["--model", model, "--device", device, "--dtype", dtype, "--slots", str(slots)],
                         env=env)


class MemorySampler(threading.Thread):
    def __init__(self, server: ServerProcess, slots: int, interval: float = 0.25):
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
    timing = model_timing(model)
    delay_frames, prefix_frames = timing["delay_frames"], timing["prefix_frames"]
    logdir = Path(tempfile.mkdtemp(prefix="kyutai-stt-bench-"))
    memory: dict[str, Any] = {}
    if config:
        formula = formula_state_memory(config, dtype_bytes(dtype, device))
        memory["formula_per_stream_mib"] = {k.replace("_bytes", ""): mib(v) for k, v in formula.items()}

    server = start_server(model, device, dtype, slots, server_threads, logdir / "server.log", flush_seconds)
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
            cmd = [sys.executable, str(BENCH_SCRIPT), "loadgen", "--url", f"ws://127.0.0.1:{server.port}",
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
        one = start_server(model, device, dtype, 1, server_threads, logdir / "server-1slot.log", flush_seconds)
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
