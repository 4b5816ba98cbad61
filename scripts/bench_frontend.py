#!/usr/bin/env python3
"""The whole server, end to end: real Ogg/Opus WebSocket clients at real time against `kyutai-stt serve`.

For each ``--workers`` value it starts one server (``--slots`` = ``--clients-max``), then probes client counts:
load generators in ``--loadgen-procs`` processes, each running hundreds of asyncio clients, each streaming a clip at
real time over ``/v1/stream`` (Ogg/Opus, ``steps=true``), starts spread over ``--ramp`` seconds. A probe passes when
every client got its ``end``, no audio frame was lost (a ``step`` event came for every frame it sent), and p99 word
latency beyond the model's delay is <= ``--budget-ms``. The search finds the largest passing count (doubling from
``--clients-start``, then bisecting to ``--resolution``).

Measured per probe: word latency beyond the delay (arrival of a word minus the moment the audio of the step that
produced it was sent) p50/p99, frame latency, frames lost, flush time (end sent -> ``end`` received), server memory
(RSS of every server process, and GPU memory from nvidia-smi when present), and the server's CPU time by thread
(event loop, IPC, engine worker, other), per second of audio per stream, from /proc/<pid>/task/*/stat. From those:
the streams one core of front end carries.

    python scripts/bench_frontend.py --model /tmp/ck_1b --make-checkpoint 1b --device cuda --dtype bfloat16 \\
        --workers 1,15 --clients-start 512 --clients-max 2048 --resolution 128 --loadgen-procs 6 --deadline-s 470

Everything is written to ``--out`` (JSON) as it comes; a table is printed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (ServerProcess, gpu_mib_by_pid, model_timing, process_tree, realtime_client,  # noqa: E402
                     role_of, rss_bytes, synthetic_opus_clip)

CLK_TCK = os.sysconf("SC_CLK_TCK")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def now() -> float:
    return time.perf_counter()


def percentile(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if len(values) else None


# ============================================================================================ the server
def thread_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far by thread kind, over the server's whole process tree."""
    out: dict[str, float] = {}
    for pid in process_tree(root):
        role = role_of(pid)
        if pid == root and role == "server" and len(process_tree(root)) > 2:
            role = "launcher"
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                comm = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
            tid = int(task.name)
            if comm.startswith("stt-engine"):
                kind = "engine worker"
            elif comm.startswith("stt-ipc-client"):
                kind = "ipc (worker side)"
            elif tid == pid and role in ("server", "worker"):
                kind = "event loop"
            elif tid == pid and role == "engine":
                kind = "ipc (engine side)"
            elif role == "launcher":
                kind = "launcher"
            else:
                kind = f"other ({role})"
            out[kind] = out.get(kind, 0.0) + seconds
    return out


def memory(root: int) -> dict:
    """RSS of every server process; their GPU memory when nvidia-smi answers."""
    pids = process_tree(root)
    gpu = gpu_mib_by_pid()
    return {"rss_mib": round(sum(rss_bytes(p) or 0 for p in pids) / 2**20, 1),
            "gpu_mib": sum(gpu.get(p, 0) for p in pids) if gpu else None}


# ============================================================================================ the clients
def loadgen_process(url: str, clients: int, first: int, seconds: float, ramp: float, delay_frames: int,
                    prefix_frames: int, out: str, client_timeout: float = 0.0) -> None:
    async def main():
        clips = [synthetic_opus_clip(seconds, i) for i in range(4)]
        rng = np.random.default_rng(first)
        starts = rng.uniform(0, ramp, size=clients) if ramp > 0 else np.zeros(clients)
        limit = client_timeout or ramp + seconds + 30  # an overloaded server must not stall the search

        async def bounded(i: int) -> dict:
            try:
                return asdict(await asyncio.wait_for(realtime_client(url, clips[(first + i) % 4], float(starts[i]),
                                                                     delay_frames, prefix_frames), limit))
            except asyncio.TimeoutError:
                return {"error": f"no end after {limit:.0f} s", "lost": 0, "audio_s": seconds}

        return await asyncio.gather(*[bounded(i) for i in range(clients)])

    Path(out).write_text(json.dumps(asyncio.run(main())))


# ============================================================================================ a probe
def probe(server: ServerProcess, clients: int, seconds: float, ramp: float, procs: int, info: dict, folder: Path,
          client_timeout: float = 0.0) -> dict:
    procs = max(1, min(procs, clients))
    ctx = multiprocessing.get_context("spawn")
    share = [clients // procs + (i < clients % procs) for i in range(procs)]
    outs = [folder / f"loadgen-{clients}-{i}.json" for i in range(procs)]
    cpu0, t0 = thread_cpu(server.proc.pid), now()
    jobs, first = [], 0
    for i, n in enumerate(share):
        jobs.append(ctx.Process(target=loadgen_process, args=(server.ws, n, first, seconds, ramp, info["delay_frames"],
                                                              info["prefix_frames"], str(outs[i]), client_timeout)))
        first += n
    peak = {"rss_mib": 0.0, "gpu_mib": None}
    for job in jobs:
        job.start()
    while any(j.is_alive() for j in jobs):
        m = memory(server.proc.pid)
        peak["rss_mib"] = max(peak["rss_mib"], m["rss_mib"])
        if m["gpu_mib"] is not None:
            peak["gpu_mib"] = max(peak["gpu_mib"] or 0, m["gpu_mib"])
        time.sleep(1.0)
    wall, cpu1 = now() - t0, thread_cpu(server.proc.pid)
    results = []
    for job, out in zip(jobs, outs):
        job.join()
        results += json.loads(out.read_text()) if out.exists() else [{"error": "load generator died"}] * 0
    words = [x for r in results for x in r.get("word", [])]
    frames = [x for r in results for x in r.get("frame", [])]
    flush = [r["flush"] for r in results if r.get("flush") is not None]
    errors = [r["error"] for r in results if r.get("error")]
    lost = sum(r.get("lost", 0) for r in results)
    audio = sum(r.get("audio_s", 0.0) for r in results)
    cpu = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
    per_stream = {k: round(v / audio, 5) if audio else None for k, v in cpu.items()}  # CPU s per audio s per stream
    front = sum(v for k, v in cpu.items() if k in ("event loop", "ipc (worker side)"))
    return {
        "clients": clients, "completed": len(results) - len(errors), "errors": errors[:5], "error_count": len(errors),
        "frames_lost": lost, "words": len(words), "audio_s": round(audio, 1), "wall_s": round(wall, 1),
        "word_latency_beyond_delay_ms": {"p50": percentile(words, 50), "p99": percentile(words, 99)},
        "frame_latency_ms": {"p50": percentile(frames, 50), "p99": percentile(frames, 99)},
        "flush_ms": {"p50": percentile(flush, 50), "p99": percentile(flush, 99)},
        "memory_peak": peak,
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_s_per_audio_s_per_stream": per_stream,
        "front_end_streams_per_core": round(audio / front, 1) if front > 0 else None,
    }


def passes(result: dict, budget_ms: float) -> bool:
    p99 = result["word_latency_beyond_delay_ms"]["p99"]
    return (result["error_count"] == 0 and result["frames_lost"] == 0 and result["completed"] == result["clients"]
            and p99 is not None and p99 <= budget_ms)


# ============================================================================================ the command
@app.command()
def main(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder (or HF repo id)."),
    make_checkpoint: Optional[str] = typer.Option(None, help="Make a random-weight checkpoint of this size (tiny, "
                                                  "1b) in --model first, unless it already holds one."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto"),
    workers: str = typer.Option("1,2", help="Comma-separated --workers values; one server (and search) each."),
    clients_start: int = typer.Option(4, min=1, help="First client count probed."),
    clients_max: int = typer.Option(8, min=1, help="Largest client count probed (= the server's slots)."),
    resolution: int = typer.Option(4, min=1, help="Stop bisecting when the pass/fail gap is this small."),
    seconds: float = typer.Option(10.0, min=1.0, help="Audio per client, streamed at real time."),
    ramp: float = typer.Option(2.0, min=0.0, help="Client starts spread uniformly over this many seconds."),
    loadgen_procs: int = typer.Option(2, min=1, help="Load-generator processes."),
    budget_ms: float = typer.Option(200.0, help="p99 word latency beyond the model delay that still passes."),
    deadline_s: float = typer.Option(3600.0, help="Global deadline: no probe starts that would end past it."),
    startup_timeout: float = typer.Option(600.0),
    client_timeout: float = typer.Option(0.0, help="A client with no `end` after this many seconds fails (0: ramp + "
                                         "seconds + 30)."),
    out: Path = typer.Option(Path("bench_frontend.json")),
) -> None:
    """Largest client count that keeps p99 word latency <= budget beyond the delay and loses nothing, per --workers."""
    t_start = now()
    folder = out.parent.resolve() / (out.stem + "-logs")
    folder.mkdir(parents=True, exist_ok=True)
    if make_checkpoint and not (Path(model) / "config.json").exists():
        from kyutai_stt.engine.kyutai.testing_checkpoint import make_checkpoint as build

        typer.echo(f"making a random {make_checkpoint} checkpoint in {model}", err=True)
        build(Path(model), make_checkpoint, 0)
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cpu": _cpu_name(), "cores": os.cpu_count(), "gpu": _gpu_name(), "budget_ms": budget_ms, "runs": []}
    probe_s = ramp + seconds + 8.0  # a probe: the ramp, the audio, the flush and start-up margin
    for w in [int(x) for x in workers.split(",")]:
        run = {"workers": w, "probes": [], "max_clients_passing": 0}
        report["runs"].append(run)
        if now() - t_start + 60 + probe_s > deadline_s:
            run["skipped"] = "global deadline"
            continue
        server = ServerProcess(folder / f"server-w{w}.log", ["--model", model, "--device", device, "--dtype", dtype,
                                                             "--slots", str(clients_max)],
                               env={"HF_HUB_OFFLINE": "1", "KYUTAI_STT_QUEUE_MAX": "0"}, workers=w)
        try:
            run["status"] = info = server.wait_ready(startup_timeout)
            run["startup_s"] = round(now() - t_start, 1)
            meta = model_timing(model)
            best, fail, n = 0, None, min(clients_start, clients_max)
            while True:
                if now() - t_start + probe_s > deadline_s:
                    run["stopped"] = "global deadline"
                    break
                typer.echo(f"workers {w}: probing {n} clients", err=True)
                result = probe(server, n, seconds, ramp, loadgen_procs, meta, folder, client_timeout)
                result["pass"] = passes(result, budget_ms)
                result["memory_idle_mib"] = memory(server.proc.pid)
                run["probes"].append(result)
                out.write_text(json.dumps(report, indent=1))
                if result["pass"]:
                    best = max(best, n)
                else:
                    fail = n if fail is None else min(fail, n)
                if fail is None:
                    if n >= clients_max:
                        break
                    n = min(clients_max, n * 2)
                else:
                    if fail - best <= resolution:
                        break
                    n = (best + fail) // 2
                    if best == 0 and n < 1:
                        break
            run["max_clients_passing"] = best
            _ = info
        except Exception as exc:  # noqa: BLE001 - recorded, and the next configuration still runs
            run["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            server.stop()
        out.write_text(json.dumps(report, indent=1))
    out.write_text(json.dumps(report, indent=1))
    print(f"### End to end ({report['gpu'] or report['cpu']}, {report['date']})\n")
    print("| workers | clients | pass | word latency beyond delay p50/p99 ms | frames lost | flush p50 ms | "
          "RSS MiB | GPU MiB | event loop | ipc (w) | ipc (e) | engine | front-end streams/core |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in report["runs"]:
        for p in run["probes"]:
            c = p["cpu_s_per_audio_s_per_stream"]
            print(f"| {run['workers']} | {p['clients']} | {'yes' if p['pass'] else 'no'} | "
                  f"{p['word_latency_beyond_delay_ms']['p50']} / {p['word_latency_beyond_delay_ms']['p99']} | "
                  f"{p['frames_lost']} | {p['flush_ms']['p50']} | {p['memory_peak']['rss_mib']} | "
                  f"{p['memory_peak']['gpu_mib']} | {c.get('event loop')} | {c.get('ipc (worker side)')} | "
                  f"{c.get('ipc (engine side)')} | {c.get('engine worker')} | {p['front_end_streams_per_core']} |")
        print(f"\nworkers {run['workers']}: largest passing client count {run['max_clients_passing']}"
              + (f" ({run.get('error') or run.get('stopped') or run.get('skipped')})"
                 if run.get("error") or run.get("stopped") or run.get("skipped") else ""))
    print("\nCPU columns: CPU seconds per second of audio per stream.")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _gpu_name() -> str | None:
    with contextlib.suppress(Exception):
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip().splitlines()[0]
    return None


if __name__ == "__main__":
    app()
