#!/usr/bin/env python
"""Soak test: N streams for M minutes against one server, every stream's words checked against the reference.

Streams join and leave at random: each of N lanes waits a random gap, picks a clip from a pool and a protocol
(events, seed or kyutai), streams the clip (paced at real time unless --fast) and checks what came back against
the single-stream reference computed beforehand with a separate model instance. Some leave abruptly in the middle
(TCP reset or a FIN without a close frame); nothing is checked for those, but the streams around them must not
notice. Reported: lost and wrong words (goal: zero), failed or refused streams, word latency percentiles (arrival
of a word minus the moment its start was sent; it includes the model's own delay), and the server's memory at
start, after warm-up and at the end.

    # the long form (on a GPU; real model; the server is started here and stopped at the end)
    python scripts/soak.py --model kyutai/stt-1b-en_fr-candle --slots 64 --streams 48 --minutes 30 \\
        --audio tests/fixtures/bria.opus --out artifacts/soak
    # against a running server (give the same model so the references match)
    python scripts/soak.py --url http://127.0.0.1:8000 --model kyutai/stt-1b-en_fr-candle --streams 8 --minutes 5

Writes summary.md and soak.json to --out and prints the summary; exits 1 when any word was lost or wrong, a stream
failed, or the server was unhealthy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import msgpack
import numpy as np
import websockets

from kyutai_stt.audio.decode import OggOpusDecoder, encode_ogg_opus, load_audio_file
from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE
from kyutai_stt.client import Client, ServerError
from kyutai_stt.messages.events import Ready, Text, Word

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ServerProcess, diff, expected_from_outputs, speech_cuts, word_tuples  # noqa: E402

PROTOCOLS = ("events", "seed", "kyutai")


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class SoakConfig:
    url: str | None = None  # a running server; None: start one
    model: str = "kyutai/stt-1b-en_fr-candle"  # what the server serves (the references need the same weights)
    device: str = "auto"
    dtype: str = "auto"
    slots: int = 8  # for a server started here
    streams: int = 8  # concurrent lanes
    seconds: float = 600.0  # how long new streams keep starting
    clips: int = 8
    clip_seconds: tuple[float, float] = (4.0, 20.0)
    audio: list[str] = field(default_factory=list)  # files to cut clips from; synthetic audio when empty
    protocols: tuple[str, ...] = PROTOCOLS
    abrupt: float = 0.15  # fraction of streams that leave abruptly
    gap_seconds: tuple[float, float] = (0.0, 3.0)  # idle time of a lane between two streams
    realtime: bool = True
    flush_seconds: float = 0.5  # must equal the server's
    seed: int = 0
    api_key: str | None = None
    port: int = 0  # for a server started here; 0: a free one
    out: str | None = None


@dataclass
class Expected:
    words: list[tuple[str, float, float]]  # over the clip as sent (PCM protocols)
    opus_text: list[str]  # the seed protocol's text pieces, over the clip after an Opus round trip
    duration: float


@dataclass
class StreamResult:
    lane: int
    protocol: str
    clip: int
    outcome: str  # "checked", "abrupt", "refused", "failed"
    expected_words: int = 0
    received_words: int = 0
    lost: int = 0
    wrong: int = 0
    latencies: list[float] = field(default_factory=list)
    audio_s: float = 0.0
    detail: str = ""


# ------------------------------------------------------------------------------------------------ references
def make_clips(config: SoakConfig) -> list[np.ndarray]:
    rng = random.Random(config.seed)
    if config.audio:
        return speech_cuts([load_audio_file(path) for path in config.audio], config.clips, config.clip_seconds, rng)
    from kyutai_stt.engine.kyutai.testing_checkpoint import synthetic_sounds

    return [synthetic_sounds(int(rng.uniform(*config.clip_seconds) * SAMPLE_RATE) / SAMPLE_RATE,
                             50_000 + config.seed * 1000 + index) for index in range(config.clips)]


def compute_references(config: SoakConfig, clips: list[np.ndarray],
                       outputs: Callable[[np.ndarray], list] | None = None, model=None) -> list[Expected]:
    """The single-stream reference of every clip, with a model instance of our own (moshi keeps streaming state on
    the modules, so it must not be the server's)."""
    if outputs is None or model is None:
        from kyutai_stt.engine.kyutai.checkpoint import load_model
        from kyutai_stt.engine.kyutai.reference import reference_outputs

        model = load_model(config.model, config.device, config.dtype)

        def outputs(pcm):
            return reference_outputs(model, pcm, config.flush_seconds)

    references = []
    for clip in clips:
        words = []
        if {"events", "kyutai"} & set(config.protocols):
            words = word_tuples(expected_from_outputs(model, outputs(clip), len(clip) / SAMPLE_RATE))
        opus_text = []
        if "seed" in config.protocols:
            decoder = OggOpusDecoder()
            heard = np.concatenate([decoder.feed(page) for page in encode_ogg_opus(clip)])
            opus_text = [e.text for e in expected_from_outputs(model, outputs(heard), len(heard) / SAMPLE_RATE)
                         if isinstance(e, Text)]
        references.append(Expected(words, opus_text, len(clip) / SAMPLE_RATE))
    return references


# ------------------------------------------------------------------------------------------------ one stream
async def checked_stream(config: SoakConfig, url: str, lane: int, protocol: str, index: int, clip: np.ndarray,
                         expected: Expected) -> StreamResult:
    result = StreamResult(lane, protocol, index, "checked", audio_s=len(clip) / SAMPLE_RATE)
    events, arrivals, ready_at = [], [], None
    client = Client(url, protocol, config.api_key)
    async for event in client.stream(clip, realtime=config.realtime):
        now = time.monotonic()
        if isinstance(event, Ready) and ready_at is None:
            ready_at = now
        events.append(event)
        arrivals.append(now)
    if protocol == "seed":
        got = "".join(e.text for e in events if isinstance(e, Text)).split()
        want = "".join(expected.opus_text).split()
        result.lost, result.wrong = diff(got, want)
    else:
        words = [(w.text, round(w.start_time, 3)) for w in events if isinstance(w, Word)]
        want = [(w[0], w[1]) for w in expected.words]
        if protocol == "kyutai":
            # moshi-server's protocol has no flush: the stream ends when the client's marker comes back, after
            # the audio plus the model's delay. Every word starting within the audio must be there, and what
            # came must be a prefix of the reference.
            required = sum(1 for w in want if w[1] <= expected.duration)
            lost_required, _ = diff(words, want[:required])
            _, wrong = diff(words, want[:max(required, len(words))])
            result.lost, result.wrong = lost_required, wrong
        else:
            result.lost, result.wrong = diff(word_tuples(events), expected.words)
        got = words
        if config.realtime and ready_at is not None:
            result.latencies = [arrival - (ready_at + event.start_time)
                                for event, arrival in zip(events, arrivals) if isinstance(event, Word)]
    result.expected_words, result.received_words = len(want), len(got)
    if result.lost or result.wrong:
        result.detail = f"got {got[:12]}... want {want[:12]}..."
    return result


def reset(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.is_closing():
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


async def abrupt_stream(config: SoakConfig, url: str, lane: int, protocol: str, index: int, clip: np.ndarray,
                        rng: random.Random) -> StreamResult:
    """Send part of the clip, then vanish: a TCP reset, or a FIN without a close frame."""
    from kyutai_stt.client import PATHS, ws_url

    part = clip[: int(len(clip) * rng.uniform(0.1, 0.9))]
    query = "?format=pcm_f32le" if protocol == "events" else ""
    headers = {"kyutai-api-key": config.api_key} if config.api_key else None
    ws = await websockets.connect(ws_url(url, PATHS[protocol]) + query, additional_headers=headers, max_size=None)
    try:
        if protocol == "seed":
            messages = encode_ogg_opus(part)
        else:
            chunks = [part[i:i + FRAME_SIZE] for i in range(0, len(part), FRAME_SIZE)]
            messages = [c.astype("<f4").tobytes() if protocol == "events"
                        else msgpack.packb({"type": "Audio", "pcm": c.tolist()}, use_single_float=True) for c in chunks]
        start = time.monotonic()
        for number, message in enumerate(messages):
            await ws.send(message)
            if config.realtime:
                await asyncio.sleep(max(0.0, start + (number + 1) * FRAME_SIZE / SAMPLE_RATE - time.monotonic()))
            else:
                await asyncio.sleep(0.005)
        if rng.random() < 0.5:
            reset(ws.transport)
        else:
            ws.transport.close()
    except websockets.ConnectionClosed as exc:
        return StreamResult(lane, protocol, index, "refused" if exc.rcvd and exc.rcvd.code == 1013 else "failed",
                            detail=f"closed before leaving: {exc}")
    finally:
        ws.transport.abort()
    return StreamResult(lane, protocol, index, "abrupt")


async def lane(config: SoakConfig, url: str, number: int, clips, references, deadline: float,
               results: list[StreamResult]) -> None:
    rng = random.Random(config.seed * 7919 + number)
    while True:
        await asyncio.sleep(rng.uniform(*config.gap_seconds))
        if time.monotonic() >= deadline:
            return
        index = rng.randrange(len(clips))
        protocol = rng.choice(config.protocols)
        try:
            if rng.random() < config.abrupt:
                result = await abrupt_stream(config, url, number, protocol, index, clips[index], rng)
            else:
                result = await checked_stream(config, url, number, protocol, index, clips[index], references[index])
        except (ServerError, websockets.ConnectionClosed, websockets.InvalidStatus, OSError, TimeoutError) as exc:
            refused = "1013" in str(exc) or "no free channels" in str(exc) or "server full" in str(exc)
            result = StreamResult(number, protocol, index, "refused" if refused else "failed",
                                  detail=f"{type(exc).__name__}: {exc}")
        results.append(result)


# ------------------------------------------------------------------------------------------------ the server
def local_server(config: SoakConfig, log_path: Path) -> ServerProcess:
    """``kyutai-stt serve`` in a subprocess, configured through the environment."""
    env = dict(KYUTAI_STT_MODEL=config.model, KYUTAI_STT_DEVICE=config.device, KYUTAI_STT_DTYPE=config.dtype,
               KYUTAI_STT_SLOTS=str(config.slots), KYUTAI_STT_HOST="127.0.0.1",
               KYUTAI_STT_FLUSH_SECONDS=str(config.flush_seconds))
    if config.api_key:
        env["KYUTAI_STT_API_KEYS"] = config.api_key
    return ServerProcess(log_path, env=env, port=config.port)


async def metrics_rss(client: httpx.AsyncClient, url: str) -> int | None:
    """The server's resident memory from its Prometheus /metrics (process collector), when it has one."""
    try:
        response = await client.get(url + "/metrics")
        for line in response.text.splitlines():
            if line.startswith("process_resident_memory_bytes"):
                return int(float(line.split()[-1]))
    except (httpx.HTTPError, ValueError):
        pass
    return None


# ------------------------------------------------------------------------------------------------ the run
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def run_soak(config: SoakConfig, *, outputs=None, model=None,
                   rss: Callable[[], int | None] | None = None) -> dict:
    """Run the soak and return its report (also written to ``config.out`` when set). ``outputs``/``model``: a
    reference function and its model, to reuse; ``rss``: how to read the server's memory (default: the local
    process, or /metrics)."""
    started_at = time.time()
    out = Path(config.out) if config.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    clips = make_clips(config)
    t = time.monotonic()
    references = compute_references(config, clips, outputs, model)
    reference_seconds = time.monotonic() - t
    server = None
    if config.url is None:
        server = local_server(config, (out or Path(".")) / "server.log")
        await asyncio.to_thread(server.wait_ready)
        url = server.url
        rss = rss or server.rss
    else:
        url = config.url
    health = {"polls": 0, "unhealthy": 0, "max_slots_in_use": 0, "rss": []}
    results: list[StreamResult] = []
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            async def read_rss() -> int | None:
                return rss() if rss else await metrics_rss(http, url)

            rss_start = await read_rss()
            deadline = time.monotonic() + config.seconds
            warmup_at = time.monotonic() + min(60.0, config.seconds / 10)
            rss_warm = None

            async def monitor():
                nonlocal rss_warm
                while True:
                    try:
                        status = (await http.get(url + "/status")).json()
                        health["polls"] += 1
                        health["unhealthy"] += not status.get("healthy", False)
                        health["max_slots_in_use"] = max(health["max_slots_in_use"], status.get("slots_in_use", 0))
                    except (httpx.HTTPError, ValueError):
                        health["unhealthy"] += 1
                    value = await read_rss()
                    if value is not None:
                        health["rss"].append(value)
                        if rss_warm is None and time.monotonic() >= warmup_at:
                            rss_warm = value
                    await asyncio.sleep(2.0)

            watcher = asyncio.create_task(monitor())
            t = time.monotonic()
            await asyncio.gather(*(lane(config, url, n, clips, references, deadline, results)
                                   for n in range(config.streams)))
            elapsed = time.monotonic() - t
            watcher.cancel()
            # the server must come back to idle with every slot free
            final = None
            for _ in range(300):
                final = (await http.get(url + "/status")).json()
                if final.get("slots_in_use") == 0:
                    break
                await asyncio.sleep(0.1)
            rss_end = await read_rss()
    finally:
        if server is not None:
            server.stop()
    report = build_report(config, results, health, final, elapsed, reference_seconds, started_at,
                          rss_start, rss_warm, rss_end)
    if out:
        (out / "soak.json").write_text(json.dumps(report, indent=2))
        (out / "summary.md").write_text(summary(report))
    return report


def build_report(config, results, health, final, elapsed, reference_seconds, started_at, rss_start, rss_warm,
                 rss_end) -> dict:
    def mib(value):
        return None if value is None else round(value / 2**20, 1)

    checked = [r for r in results if r.outcome == "checked"]
    latencies = [x for r in checked for x in r.latencies]
    by_protocol = {p: {o: sum(1 for r in results if r.protocol == p and r.outcome == o)
                       for o in ("checked", "abrupt", "refused", "failed")} for p in config.protocols}
    lost = sum(r.lost for r in checked)
    wrong = sum(r.wrong for r in checked)
    failed = [r for r in results if r.outcome == "failed"]
    report = {
        "config": {k: v for k, v in asdict(config).items() if k != "api_key"},
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_at)),
        "elapsed_s": round(elapsed, 1),
        "reference_s": round(reference_seconds, 1),
        "streams": {"total": len(results), "checked": len(checked),
                    "abrupt": sum(r.outcome == "abrupt" for r in results),
                    "refused": sum(r.outcome == "refused" for r in results), "failed": len(failed),
                    "by_protocol": by_protocol,
                    "audio_s_checked": round(sum(r.audio_s for r in checked), 1)},
        "words": {"expected": sum(r.expected_words for r in checked),
                  "received": sum(r.received_words for r in checked), "lost": lost, "wrong": wrong, "streams_with_errors": sum(1 for r in checked if r.lost or r.wrong)},
        "latency_s": None if not latencies else {
            "words": len(latencies), **{f"p{q}": round(percentile(latencies, q), 3) for q in (50, 90, 99)},
            "max": round(max(latencies), 3)},
        "memory_mib": {"start": mib(rss_start), "after_warmup": mib(rss_warm), "end": mib(rss_end),
                       "max": mib(max(health["rss"])) if health["rss"] else None,
                       "drift_from_start": None if rss_start is None or rss_end is None else mib(rss_end - rss_start),
                       "drift_from_warmup": None if rss_warm is None or rss_end is None else mib(rss_end - rss_warm)},
        "server": {"status_polls": health["polls"], "unhealthy_polls": health["unhealthy"],
                   "max_slots_in_use": health["max_slots_in_use"], "final_status": final},
        "problems": [asdict(r) | {"latencies": None} for r in results
                     if r.outcome == "failed" or r.lost or r.wrong][:20],
    }
    report["ok"] = (lost == 0 and wrong == 0 and not failed and health["unhealthy"] == 0
                    and final is not None and final.get("slots_in_use") == 0 and len(checked) > 0)
    return report


def summary(report: dict) -> str:
    c, s, w, m = report["config"], report["streams"], report["words"], report["memory_mib"]
    lat = report["latency_s"]
    source = "from " + ", ".join(Path(a).name for a in c["audio"]) if c["audio"] else "synthetic"
    lines = [
        f"## Soak: {c['streams']} streams for {c['seconds'] / 60:.1f} min ({'real time' if c['realtime'] else 'fast'})",
        "",
        f"Model `{c['model']}` ({c['device']}, {c['dtype']}), clips of {c['clip_seconds'][0]:g} to "
        f"{c['clip_seconds'][1]:g} s ({source}), protocols {', '.join(c['protocols'])}, {c['abrupt']:.0%} abrupt leaves. Started {report['started']}.",
        "",
        "| | |",
        "|---|---|",
        f"| result | **{'PASS' if report['ok'] else 'FAIL'}** |",
        f"| streams checked / abrupt / refused / failed | {s['checked']} / {s['abrupt']} / {s['refused']} / "
        f"{s['failed']} |",
        f"| words expected / received | {w['expected']} / {w['received']} |",
        f"| lost words / wrong words | **{w['lost']} / {w['wrong']}** ({w['streams_with_errors']} streams) |",
        "| word latency p50 / p90 / p99 / max | " + (f"{lat['p50']} / {lat['p90']} / **{lat['p99']}** / {lat['max']} s "
                                                     f"({lat['words']} words)" if lat else "n/a (not paced)") + " |",
        f"| server RSS start / after warm-up / end / max | {m['start']} / {m['after_warmup']} / {m['end']} / "
        f"{m['max']} MiB |",
        f"| memory drift (end - start, end - warm-up) | {m['drift_from_start']} / {m['drift_from_warmup']} MiB |",
        f"| max slots in use, unhealthy /status polls | {report['server']['max_slots_in_use']}, "
        f"{report['server']['unhealthy_polls']} |",
        "",
    ]
    for problem in report["problems"][:5]:
        lines.append(f"- {problem['protocol']} clip {problem['clip']}: {problem['outcome']} lost {problem['lost']} "
                     f"wrong {problem['wrong']} {problem['detail'][:300]}")
    return "\n".join(lines) + "\n"


def parse_range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    return float(low), float(high or low)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one here)")
    parser.add_argument("--model", default=SoakConfig.model, help="the served model; the references use it too")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--slots", type=int, default=8, help="slots of the server started here")
    parser.add_argument("--streams", type=int, default=8, help="concurrent lanes")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, help="duration in seconds (overrides --minutes)")
    parser.add_argument("--clips", type=int, default=8, help="size of the clip pool")
    parser.add_argument("--clip-seconds", default="4:20", help="clip length range, MIN:MAX")
    parser.add_argument("--audio", action="append", default=[], help="audio file to cut clips from (repeatable)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--abrupt", type=float, default=0.15, help="fraction of streams that leave abruptly")
    parser.add_argument("--gap", default="0:3", help="idle time of a lane between streams, MIN:MAX seconds")
    parser.add_argument("--fast", action="store_true", help="send audio as fast as possible (no latency figures)")
    parser.add_argument("--flush-seconds", type=float, default=0.5, help="the server's flush_seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=os.environ.get("KYUTAI_STT_API_KEY"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", default="artifacts/soak", help="folder for summary.md, soak.json, server.log")
    args = parser.parse_args(argv)
    config = SoakConfig(url=args.url, model=args.model, device=args.device, dtype=args.dtype, slots=args.slots,
                        streams=args.streams, seconds=args.seconds if args.seconds else args.minutes * 60,
                        clips=args.clips, clip_seconds=parse_range(args.clip_seconds), audio=args.audio,
                        protocols=tuple(p.strip() for p in args.protocols.split(",") if p.strip()),
                        abrupt=args.abrupt, gap_seconds=parse_range(args.gap), realtime=not args.fast,
                        flush_seconds=args.flush_seconds, seed=args.seed, api_key=args.api_key, port=args.port,
                        out=args.out)
    if set(config.protocols) - set(PROTOCOLS):
        parser.error(f"--protocols: choose from {', '.join(PROTOCOLS)}")
    report = asyncio.run(run_soak(config))
    print(summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
