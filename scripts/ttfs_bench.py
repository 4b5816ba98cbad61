#!/usr/bin/env python
"""TTFS (time to final segment) of a kyutai-stt server, measured as Pipecat's stt-benchmark measures it.

Starts ``kyutai-stt serve`` on a free port (or uses ``--url``), then for each concurrency in ``--clients`` and each
protocol in ``--protocols`` runs that many sessions at once. Each session speaks real speech (utterances cut from
tests/fixtures/bria.opus) at real-time pace in 20 ms chunks; when Silero VAD (``stop_secs=0.2``) says the speaker
stopped, the client finalizes; TTFS = arrival of the final transcript - (VAD stop - stop_secs).

- ``pipecat``: Pipecat's own pipeline (VADProcessor + SileroVADAnalyzer + DeepgramSTTService pointed at the server);
  the sample is the TTFB metric Pipecat itself reports on the ``from_finalize`` result (scripts/ttfskit/pipecat_run.py).
- ``deepgram``, ``realtime``, ``kyutai``, ``stream``: light clients of our other protocols replaying the same VAD
  decisions (scripts/ttfs_plan.json), cheap enough for hundreds of sessions (scripts/ttfskit/light.py).

Printed per protocol and concurrency: TTFS median / p95 / p99 / max, the mean engine step time during the run
(from /metrics), the compute floor (stop_secs + the steps the words still need after the VAD stop, at that step
time), and, once per server-side flush, the frames the server's flush adds per turn (measured on /status), the
server's own share (``kyutai_stt_finalize_seconds``: finalize in to final words out, p50 / p99 as the upper bound of
their histogram bucket; what TTFS adds beyond it is the client's VAD, the network and the client's own work). Then
whether issue 19's targets hold. Markdown on stdout, JSON with ``--out``.

    uv run python scripts/ttfs_bench.py run --model /work/ckpt/tiny --slots 4 --clients 1,3   # the CPU run
    uv run python scripts/ttfs_bench.py plan                                                  # rebuild the plan
    bash scripts/gpu_ttfs.sh                                                                  # the GPU run
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import typer

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # run as a file or loaded by path (tests)
    sys.path.insert(0, _HERE)

from harness import ServerProcess, model_timing  # noqa: E402
from ttfskit import light, plan  # noqa: E402
from ttfskit.plan import STOP_SECS  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TTFS benchmark (issue 19): Pipecat's method against a kyutai-stt server.")
FRAME_S = 0.08
PROTOCOLS = ("pipecat", *light.PROTOCOLS)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ============================================================================================ the server's figures
def server_metrics(url: str) -> str:
    """The server's /metrics, read once for ``step_totals`` and ``finalize_buckets``."""
    import httpx

    return httpx.get(url + "/metrics", timeout=30).text


def step_totals(text: str) -> tuple[float, float]:
    """(sum of step seconds, count of steps) of the engine so far, from /metrics' ``text``."""
    total = {}
    for name in ("sum", "count"):
        match = re.search(rf"^kyutai_stt_step_duration_seconds_{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        total[name] = float(match.group(1)) if match else 0.0
    return total["sum"], total["count"]


def finalize_buckets(text: str) -> dict[float, float]:
    """The server's ``kyutai_stt_finalize_seconds`` histogram so far, from /metrics' ``text``: upper bound ->
    finalizes at or under it."""
    return {float(le): float(v) for le, v in
            re.findall(r'^kyutai_stt_finalize_seconds_bucket{[^}]*le="([^"]+)"[^}]*} ([0-9.eE+-]+)$', text, re.M)}


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding the ``q`` quantile of the finalizes timed between the two readings
    (nan if none)."""
    counts = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = counts[-1][1] if counts else 0.0
    return next((le for le, n in counts if n >= q * total), math.nan) if total else math.nan


def frames_done(url: str) -> int:
    import httpx

    return int(httpx.get(url + "/status", timeout=30).json()["frames"])


def wait_idle(url: str, timeout: float = 600.0) -> float:
    """Until no slot is in use (the previous run's streams still flushing their backlog hold theirs): a run starts
    on an idle engine and its sessions are never refused. Returns the seconds waited."""
    import httpx

    start = time.perf_counter()
    while httpx.get(url + "/status", timeout=30).json()["slots_in_use"] and time.perf_counter() - start < timeout:
        time.sleep(0.5)
    return time.perf_counter() - start


def needed_steps(delay_frames: int, frames_per_step: int, stop_secs: float = STOP_SECS) -> int:
    """Engine steps the last word still needs at the VAD stop: the rest of the model's delay beyond the stop_secs
    of silence already sent, plus one frame (the word rule closes a word at the next token)."""
    frames = max(0, delay_frames - math.floor(stop_secs / FRAME_S + 1e-9)) + 1
    return -(-frames // frames_per_step)


async def flush_probe(protocol: str, base_ws: str, url: str) -> int | None:
    """Frames the server's own flush adds per finalize: one stream alone sends 24 frames of 24 kHz speech,
    finalizes, waits for the final, and the engine's frame count beyond those 24 is the flush."""
    import numpy as np
    import websockets

    source = plan.load_source()
    audio = np.clip(np.round(source[24000:24000 + 24 * 1920] * 32767), -32768, 32767).astype("<i2").tobytes()
    if protocol == "deepgram":
        path, first = "/v1/listen?encoding=linear16&sample_rate=24000", []
        send = [audio]
        finalize = json.dumps({"type": "Finalize"})

        def is_final(m):
            return isinstance(m, str) and json.loads(m).get("from_finalize") is True
    elif protocol == "realtime":
        import base64

        path = "/v1/realtime?intent=transcription"
        first = [json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}}}})]
        send = [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode()})]
        finalize = json.dumps({"type": "input_audio_buffer.commit"})

        def is_final(m):
            return json.loads(m).get("type") == "conversation.item.input_audio_transcription.completed"
    else:
        return None
    before = frames_done(url)
    async with websockets.connect(base_ws + path, max_size=None, open_timeout=120) as ws:
        for message in first + send:
            await ws.send(message)
        await ws.send(finalize)
        async for message in ws:
            if is_final(message):
                break
        previous = -1
        while (now := frames_done(url)) != previous:  # the frames after the acknowledgement too
            previous = now
            await asyncio.sleep(1.0)
    return previous - before - 24


# ============================================================================================ one run
def _light_worker(args: tuple) -> list[dict]:
    """A load-generator process's share of the light sessions (``--procs``)."""
    (protocol, base_ws, delay, fps, utterances, sessions, per_session, first, ramp) = args
    source = plan.load_source()
    results = asyncio.run(light.run_sessions(protocol, base_ws, delay, fps, source, utterances, sessions, per_session,
                                             first, ramp))
    return [r.__dict__ for r in results]


def run_one(protocol: str, server_url: str, sessions: int, per_session: int, utterances, delay: int, fps: int,
            procs: int, ramp: float) -> dict:
    base_ws = server_url.replace("http", "ws", 1)
    waited = wait_idle(server_url)
    if waited > 1:
        log(f"  waited {waited:.0f} s for the previous run's streams to finish")
    before = server_metrics(server_url)
    steps_before, finalized_before = step_totals(before), finalize_buckets(before)
    t = time.perf_counter()
    if protocol == "pipecat":
        from ttfskit import pipecat_run

        results = [r.__dict__ for r in asyncio.run(pipecat_run.run_sessions(
            server_url, plan.load_source(), utterances, sessions, per_session, ramp))]
    else:
        procs = max(1, min(procs, sessions))
        shares = [sessions // procs + (i < sessions % procs) for i in range(procs)]
        firsts = [sum(shares[:i]) for i in range(procs)]
        jobs = [(protocol, base_ws, delay, fps, utterances, n, per_session, f, ramp) for n, f in zip(shares, firsts)]
        if procs == 1:
            results = _light_worker(jobs[0])
        else:
            with ProcessPoolExecutor(procs) as pool:
                results = [r for share in pool.map(_light_worker, jobs) for r in share]
    wall = time.perf_counter() - t
    after = server_metrics(server_url)
    steps_after, finalized_after = step_totals(after), finalize_buckets(after)
    count = steps_after[1] - steps_before[1]
    step_s = (steps_after[0] - steps_before[0]) / count if count else math.nan
    ttfs = [v for r in results for v in r["ttfs"]]
    return {"protocol": protocol, "sessions": sessions, "turns": sessions * per_session, "ttfs_s": ttfs,
            "stats": light.percentiles(ttfs), "missing": sum(r["missing"] for r in results),
            "errors": [r["error"] for r in results if r["error"]], "step_ms": step_s * 1000, "steps": count,
            "floor_s": STOP_SECS + needed_steps(delay, fps) * step_s, "wall_s": wall,
            "busy": (steps_after[0] - steps_before[0]) / wall,
            "server_finalize_p50_s": bucket_quantile(finalized_before, finalized_after, 0.5),
            "server_finalize_p99_s": bucket_quantile(finalized_before, finalized_after, 0.99),
            "client_late_p99_ms": 1000 * max((r.get("late_p99_s", 0.0) for r in results), default=0.0),
            "load_avg": os.getloadavg()}


# ============================================================================================ report
def table(rows: list[dict], flush_frames: dict) -> str:
    lines = ["| protocol | sessions | turns | TTFS p50 s | p95 s | p99 s | max s | missing | errors | step ms "
             "| floor s | engine busy | flush frames/turn | server finalize p50 / p99 s | client late p99 ms "
             "| load avg |", "|" + "---:|" * 16]
    for r in rows:
        s = r["stats"]
        lines.append(f"| {r['protocol']} | {r['sessions']} | {s['count']}/{r['turns']} | {s['p50']:.3f} | "
                     f"{s['p95']:.3f} | {s['p99']:.3f} | {s['max']:.3f} | {r['missing']} | {len(r['errors'])} | "
                     f"{r['step_ms']:.1f} | {r['floor_s']:.3f} | {100 * r.get('busy', math.nan):.0f} % | "
                     f"{flush_frames.get(r['protocol'], '-')} | "
                     f"{r.get('server_finalize_p50_s', math.nan):.2f} / "
                     f"{r.get('server_finalize_p99_s', math.nan):.2f} | "
                     f"{r.get('client_late_p99_ms', math.nan):.1f} | {r['load_avg'][0]:.1f} |")
    return "\n".join(lines)


def targets(rows: list[dict], target: str, load_sessions: int) -> list[tuple[str, bool]]:
    """Issue 19's done-when, per protocol: CPU, p99 with one client <= 0.2 s + 1.5x floor and p99 at the load
    <= 1.5x that one-client p99; GPU, p99 <= 0.30 s with one session and at the load (half the capacity)."""
    out = []
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        by = {r["sessions"]: r for r in rows if r["protocol"] == protocol}
        one, loaded = by.get(1), by.get(load_sessions)

        def ok(row):  # every turn measured, nothing failed. Pipecat's pipeline may report more samples than turns:
            # each is a finalize it sent and the TTFB it measured, so none is dropped
            return row["stats"]["count"] >= row["turns"] and not row["missing"] and not row["errors"]

        if target == "cpu":
            if one:
                limit = 0.2 + 1.5 * one["floor_s"]
                out.append((f"{protocol}: one client p99 {one['stats']['p99']:.3f} s <= 0.2 + 1.5 x floor "
                            f"{one['floor_s']:.3f} = {limit:.3f} s", ok(one) and one["stats"]["p99"] <= limit))
            if one and loaded and load_sessions != 1:
                limit = 1.5 * one["stats"]["p99"]
                out.append((f"{protocol}: {load_sessions} clients p99 {loaded['stats']['p99']:.3f} s <= 1.5 x one "
                            f"client's p99 = {limit:.3f} s", ok(loaded) and loaded["stats"]["p99"] <= limit))
        else:
            for n, row in ((1, one), (load_sessions, loaded)):
                if row:
                    out.append((f"{protocol}: {n} sessions p99 {row['stats']['p99']:.3f} s <= 0.30 s",
                                ok(row) and row["stats"]["p99"] <= 0.30))
    return out


# ============================================================================================ commands
@app.command("plan")
def plan_command(count: int = typer.Option(24, help="Utterances."), seed: int = typer.Option(19)) -> None:
    """Rebuild scripts/ttfs_plan.json: utterances of bria.opus and where Pipecat's Silero VAD stops on each."""
    utterances = plan.build(count, seed)
    plan.save(utterances)
    log(f"wrote {plan.PLAN_PATH} ({len(utterances)} utterances)")


@app.command("run")
def run(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder (kyutai-stt make-checkpoint) or HF repo."),
    clients: str = typer.Option("1,3", help="Concurrent sessions, comma-separated, one run each."),
    protocols: str = typer.Option(",".join(PROTOCOLS), help=f"Any of {', '.join(PROTOCOLS)}."),
    utterances: int = typer.Option(8, min=1, help="Utterances (turns) per session."),
    slots: int = typer.Option(4, min=1, help="The server's --slots."),
    workers: Optional[int] = typer.Option(None, help="The server's --workers (front-end processes)."),
    capacity: Optional[int] = typer.Option(None, help="The engine's capacity in sessions (default: --slots); the "
                                                      "loaded run is 90 % of it on CPU, half of it on GPU."),
    target: str = typer.Option("auto", help="cpu or gpu targets of issue 19 (auto: from --device)."),
    device: str = typer.Option("cpu", help="The server's --device."),
    dtype: str = typer.Option("auto", help="The server's --dtype."),
    frames_per_step: int = typer.Option(0, help="The server's frames per step (0: its auto, 2 on CPU, 1 on GPU)."),
    threads: Optional[int] = typer.Option(None, help="OMP_NUM_THREADS of the server (CPU)."),
    url: Optional[str] = typer.Option(None, help="Use this running server (http://host:port) instead of starting one."),
    make_checkpoint: Optional[str] = typer.Option(None, help="Make a random checkpoint of this size (tiny, 1b) in "
                                                             "--model first, if it has none."),
    procs: int = typer.Option(1, min=1, help="Processes for the light clients (hundreds of sessions)."),
    ramp: float = typer.Option(1.0, help="Sessions start at random within this many seconds."),
    probe: bool = typer.Option(True, help="Measure the server's flush frames per turn first."),
    final_timeout: float = typer.Option(light.FINAL_TIMEOUT_S, help="Seconds a client waits for a final before "
                                                                    "counting it missing and going on."),
    startup_timeout: float = typer.Option(900.0),
    client_nice: int = typer.Option(0, min=0, max=19, help="Run the clients (this process, once the server has "
                                    "started) at this niceness: on a small machine the load generator, Pipecat's "
                                    "pipelines above all, competes with the server it measures for the cores."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write every sample and figure as JSON here."),
) -> None:
    """TTFS median / p95 / p99 per protocol and concurrency, the compute floor, flush frames, issue 19's targets."""
    names = [p.strip() for p in protocols.split(",") if p.strip()]
    unknown = set(names) - set(PROTOCOLS)
    if unknown:
        raise typer.BadParameter(f"unknown protocol(s) {sorted(unknown)}: use {', '.join(PROTOCOLS)}")
    counts = [int(c) for c in clients.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        raise typer.BadParameter("--clients: positive integers")
    target = target if target != "auto" else ("gpu" if device.startswith("cuda") else "cpu")
    capacity = capacity or slots
    load_sessions = max(1, int(capacity * 0.9)) if target == "cpu" else max(1, capacity // 2)
    fps = frames_per_step or (1 if device.startswith("cuda") else 2)
    if make_checkpoint and not (Path(model) / "config.json").exists():
        from kyutai_stt.engine.kyutai.testing_checkpoint import make_checkpoint as build

        log(f"making a random {make_checkpoint} checkpoint in {model}")
        build(Path(model), make_checkpoint)
    light.FINAL_TIMEOUT_S = final_timeout  # read by both kinds of client at run time
    delay = model_timing(model)["delay_frames"]
    utts = plan.load()
    server = None
    if url is None:
        env = {"HF_HUB_OFFLINE": "1", "KYUTAI_STT_FRAMES_PER_STEP": str(fps)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        log_path = Path(os.environ.get("TTFS_LOG_DIR", "/tmp")) / f"ttfs-server-{os.getpid()}.log"
        server = ServerProcess(log_path, ["--model", model, "--slots", str(slots), "--device", device,
                                          "--dtype", dtype], env=env, workers=workers)
        log(f"starting the server (log {log_path})")
        server.wait_ready(startup_timeout)
        url = server.url
    if client_nice:
        os.nice(client_nice)  # after the server's start: it keeps its own priority; client processes inherit this
    machine = {"load_avg_start": os.getloadavg(), "cpus": os.cpu_count(), "client_nice": client_nice,
               "date_utc": time.strftime(
        "%Y-%m-%d %H:%M", time.gmtime())}
    rows, flush = [], {}
    try:
        if probe:
            for name in ("deepgram", "realtime"):
                if name in names or (name == "deepgram" and "pipecat" in names):
                    flush[name] = asyncio.run(flush_probe(name, url.replace("http", "ws", 1), url))
                    log(f"flush frames per {name} finalize: {flush[name]}")
            if "pipecat" in names and "deepgram" in flush:
                flush["pipecat"] = flush["deepgram"]
            for name in ("kyutai", "stream"):  # the client's own flush: the zeros it sends at once
                flush[name] = f"{delay + fps} (client)"
        for n in counts:
            for name in names:
                log(f"{name}: {n} session(s) x {utterances} turns")
                row = run_one(name, url, n, utterances, utts, delay, fps, procs, ramp)
                s = row["stats"]
                log(f"  TTFS p50 {s['p50']:.3f} p95 {s['p95']:.3f} p99 {s['p99']:.3f} s, {s['count']}/{row['turns']} "
                    f"turns, step {row['step_ms']:.1f} ms, load {row['load_avg'][0]:.1f}"
                    + (f", errors: {row['errors'][:2]}" if row["errors"] else ""))
                rows.append(row)
                if out:  # as they come: a run cut short keeps what it measured
                    save(out, {"machine": machine, "model": model, "partial": True, "rows": rows,
                               "flush_frames": flush})
    finally:
        if server is not None:
            server.stop()
    machine["load_avg_end"] = os.getloadavg()
    print(f"### TTFS ({model}, {device}, slots {slots}, {fps} frame(s) per step, {utterances} turns per session)\n")
    print(table(rows, flush))
    print(f"\nfloor = stop_secs {STOP_SECS} + {needed_steps(delay, fps)} steps x step time "
          f"(delay {delay} frames, {fps} frame(s) per step); load average {machine['load_avg_start'][0]:.1f} at "
          f"start, {machine['load_avg_end'][0]:.1f} at end on {machine['cpus']} cores\n")
    checks = targets(rows, target, load_sessions)
    for text, holds in checks:
        print(f"- {'HOLDS' if holds else 'FAILS'}: {text}")
    if out:
        save(out, {"machine": machine, "model": model, "device": device, "slots": slots, "frames_per_step": fps,
                   "delay_frames": delay, "capacity": capacity, "load_sessions": load_sessions, "command": sys.argv,
                   "git": git_commit(), "flush_frames": flush, "rows": rows,
                   "targets": [{"check": t, "holds": h} for t, h in checks]})
        log(f"wrote {out}")


def save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    app()
