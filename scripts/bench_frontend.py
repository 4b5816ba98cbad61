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
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
FRAME_S = 0.08
CLK_TCK = os.sysconf("SC_CLK_TCK")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def now() -> float:
    return time.perf_counter()


def percentile(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if len(values) else None


# ============================================================================================ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def role_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"KYUTAI_STT_PROCESS_ROLE="):
                return item.split(b"=", 1)[1].decode().split("-")[0]  # engine | worker
    return "server"


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
    rss = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
    gpu = None
    with contextlib.suppress(Exception):
        pids = set(process_tree(root))
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout
        gpu = sum(int(m) for p, m in (line.split(",") for line in text.strip().splitlines()) if int(p) in pids)
    return {"rss_mib": round(rss / 2**20, 1), "gpu_mib": gpu}


class Server:
    def __init__(self, model: str, device: str, dtype: str, slots: int, workers: int, log_path: Path):
        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.log_path = log_path
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", KYUTAI_STT_QUEUE_MAX="0")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kyutai_stt.cli", "serve", "--model", model, "--device", device, "--dtype", dtype,
             "--slots", str(slots), "--workers", str(workers), "--port", str(self.port)],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.workers = workers

    def wait_ready(self, timeout: float) -> dict:
        import httpx

        deadline = now() + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_path}")
            workers = sum(role_of(p) == "worker" for p in process_tree(self.proc.pid))
            if self.workers == 1 or workers == self.workers:
                with contextlib.suppress(Exception):
                    r = httpx.get(self.http + "/status", timeout=2)
                    if r.status_code == 200:
                        return r.json()
            time.sleep(0.3)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s; see {self.log_path}")

    def status(self) -> dict:
        import httpx

        return httpx.get(self.http + "/status", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in process_tree(self.proc.pid)[::-1]:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


# ============================================================================================ the clients
def make_clip(seconds: float, seed: int) -> dict:
    """Ogg/Opus pages, and for each 80 ms audio frame the page after which the server can decode it."""
    from kyutai_stt.audio.decode import OggOpusDecoder, encode_ogg_opus
    from kyutai_stt.audio.constants import FRAME_SIZE
    from kyutai_stt.engine.kyutai.testing_checkpoint import synthetic_sounds

    pages = encode_ogg_opus(synthetic_sounds(seconds, 7000 + seed))
    decoder, ready, total = OggOpusDecoder(), [], 0
    for p, page in enumerate(pages):
        total += len(decoder.feed(page))
        while (len(ready) + 1) * FRAME_SIZE <= total:
            ready.append(p)
    frames = -(-total // FRAME_SIZE)
    return {"pages": pages, "ready": ready, "frames": frames}


async def run_client(url: str, clip: dict, start: float, delay_frames: int, prefix_frames: int) -> dict:
    import websockets

    await asyncio.sleep(start)
    pages, ready = clip["pages"], clip["ready"]
    sent_at = [math.nan] * len(pages)
    result = {"word": [], "frame": [], "flush": None, "words": 0, "lost": 0, "error": None, "audio_s": 0.0}
    steps_seen: set[int] = set()
    end_sent = None
    try:
        async with websockets.connect(f"{url}/v1/stream?format=opus&steps=true", max_size=None, open_timeout=60,
                                      ping_interval=None) as ws:
            t0 = now()

            async def sender():
                nonlocal end_sent
                for k, page in enumerate(pages):
                    delay = t0 + (k + 1) * FRAME_S - now()  # page k holds audio captured until then (80 ms pages)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await ws.send(page)
                    sent_at[k] = now()
                await ws.send(json.dumps({"type": "end"}))
                end_sent = now()

            def audio_sent(step: int) -> float | None:
                a = step - prefix_frames
                if a < 0:
                    return t0
                return sent_at[ready[a]] if a < len(ready) else None

            task = asyncio.create_task(sender())
            last_step = -1
            try:
                async for message in ws:
                    t = now()
                    event = json.loads(message)
                    kind = event["type"]
                    if kind == "step":
                        last_step = event["step_idx"]
                        steps_seen.add(last_step)
                        a = audio_sent(last_step)
                        if a is not None and not math.isnan(a):
                            result["frame"].append(t - a)
                    elif kind == "word":
                        result["words"] += 1
                        a = audio_sent(last_step)
                        if a is not None and not math.isnan(a):
                            result["word"].append(t - a)
                    elif kind == "end":
                        if end_sent is not None:
                            result["flush"] = t - end_sent
                        result["audio_s"] = event["duration"]
                        break
                    elif kind == "error":
                        raise RuntimeError(event.get("message"))
            finally:
                task.cancel()
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the others
        result["error"] = f"{type(exc).__name__}: {exc}"[:200]
    if not result["audio_s"]:  # no `end`: count the audio sent
        result["audio_s"] = sum(not math.isnan(t) for t in sent_at) / len(pages) * clip["frames"] * FRAME_S
    expected = range(prefix_frames, prefix_frames + clip["frames"])
    result["lost"] = sum(1 for f in expected if f not in steps_seen)
    return result


def loadgen_process(url: str, clients: int, first: int, seconds: float, ramp: float, delay_frames: int,
                    prefix_frames: int, out: str, client_timeout: float = 0.0) -> None:
    async def main():
        clips = [make_clip(seconds, i) for i in range(4)]
        rng = np.random.default_rng(first)
        starts = rng.uniform(0, ramp, size=clients) if ramp > 0 else np.zeros(clients)
        limit = client_timeout or ramp + seconds + 30  # an overloaded server must not stall the search

        async def bounded(i: int) -> dict:
            try:
                return await asyncio.wait_for(run_client(url, clips[(first + i) % 4], float(starts[i]), delay_frames,
                                                         prefix_frames), limit)
            except asyncio.TimeoutError:
                return {"error": f"no end after {limit:.0f} s", "lost": 0, "audio_s": seconds}

        return await asyncio.gather(*[bounded(i) for i in range(clients)])

    Path(out).write_text(json.dumps(asyncio.run(main())))


# ============================================================================================ a probe
def probe(server: Server, clients: int, seconds: float, ramp: float, procs: int, info: dict, folder: Path,
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
        server = Server(model, device, dtype, clients_max, w, folder / f"server-w{w}.log")
        try:
            run["status"] = info = server.wait_ready(startup_timeout)
            run["startup_s"] = round(now() - t_start, 1)
            meta = {"delay_frames": 0, "prefix_frames": 0}
            from kyutai_stt.audio.constants import FRAME_RATE  # noqa: F401  (the server reports frames; we need delays)
            meta.update(_model_timing(model))
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


def _model_timing(model: str) -> dict:
    config = json.loads((Path(model) / "config.json").read_text()) if (Path(model) / "config.json").exists() else {}
    stt = config.get("stt_config", {})
    return {"delay_frames": round(stt.get("audio_delay_seconds", 0.0) * 12.5),
            "prefix_frames": round(stt.get("audio_silence_prefix_seconds", 0.0) * 12.5)}


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
