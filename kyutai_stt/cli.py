"""The ``kyutai-stt`` command: serve, transcribe, make-checkpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Streaming speech-to-text with Kyutai's delayed-streams models.")
err = Console(stderr=True)


def _logging(verbose: bool, fmt: str = "text") -> None:
    from kyutai_stt.serve.logs import setup_logging

    setup_logging(fmt, verbose)


def _default(field: str):
    from kyutai_stt.settings import Settings

    return Settings.model_fields[field].default


def _settings(**overrides):
    """The settings from the environment and the flags given; a value out of range is a usage error (exit 2), told
    by the setting's flag and environment variable, not a traceback."""
    from pydantic import ValidationError

    from kyutai_stt.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for problem in exc.errors():
            name = str(problem["loc"][0]) if problem["loc"] else "?"
            err.print(f"[red]error:[/red] --{name.replace('_', '-')} / KYUTAI_STT_{name.upper()}: {problem['msg']} "
                      f"(got {problem.get('input')!r})", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Listen address [env KYUTAI_STT_HOST, default 127.0.0.1]."),
    port: Optional[int] = typer.Option(None, help="Port [env KYUTAI_STT_PORT, default 8000]."),
    model: Optional[str] = typer.Option(None, help=f"HF repo id or local checkpoint folder [env KYUTAI_STT_MODEL, "
                                        f"default {_default('model')}]."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N [env KYUTAI_STT_DEVICE, default "
                                         f"{_default('device')}: cuda when available]."),
    dtype: Optional[str] = typer.Option(None, help="auto, bfloat16, float16, float32 [env KYUTAI_STT_DTYPE, default "
                                        f"{_default('dtype')}: bfloat16 on GPU, float32 on CPU]."),
    slots: Optional[int] = typer.Option(None, help="Concurrent streams in one batch [env KYUTAI_STT_SLOTS, default "
                                        f"{_default('slots')}]."),
    record_dir: Optional[str] = typer.Option(None, help="Debug: save each session's decoded audio here."),
    api_key: Optional[list[str]] = typer.Option(None, help="Accepted API key (repeat for several) [env KYUTAI_STT_API_KEYS]."),
    log_format: Optional[str] = typer.Option(None, help="text or json [env KYUTAI_STT_LOG_FORMAT]."),
    workers: Optional[int] = typer.Option(None, help="Front-end worker processes sharing the port, around one engine "
                                          "process; 0: auto (cores - 1 on CUDA, 1 on CPU) [env KYUTAI_STT_WORKERS]."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the model (the CPU only); 0: auto (OMP_NUM_THREADS, "
                                          "else cores - 1, at least 1) [env KYUTAI_STT_THREADS]."),
    nemo_lookahead: Optional[int] = typer.Option(None, help="NVIDIA (.nemo) models: encoder frames of right context "
                                                 "per chunk (the chunk is lookahead + 1 x 80 ms) [env "
                                                 "KYUTAI_STT_NEMO_LOOKAHEAD, default: the model's own]."),
    diarizer: Optional[str] = typer.Option(None, help="Speakers for streams that ask (diarize=true): "
                                           "nvidia/diar_streaming_sortformer_4spk-v2, a .nemo file or random:tiny; "
                                           "needs the nemo extra and --workers 1 [env KYUTAI_STT_DIARIZER]."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs."),
) -> None:
    """Run the server: WebSocket streaming, HTTP transcription, browser page."""
    from kyutai_stt.engine.contract import ModelLoadError
    from kyutai_stt.engine.startup import load
    from kyutai_stt.serve.server import serve as run_server

    settings = _settings(host=host, port=port, model=model, device=device, dtype=dtype, slots=slots,
                         record_dir=record_dir, api_keys=api_key or None, log_format=log_format, workers=workers,
                         threads=threads, nemo_lookahead=nemo_lookahead, diarizer=diarizer)
    _logging(verbose, settings.log_format)
    _check_port(settings.host, settings.port)
    from kyutai_stt.serve.workers import default_workers, serve_workers

    def ready() -> None:  # once the engine is warm and the socket listens: the URL answers from now on
        err.print(f"kyutai-stt: open [bold]http://{settings.host}:{settings.port}/[/bold] "
                  f"(streaming: ws://{settings.host}:{settings.port}/v1/stream, /api/asr-streaming, /ws)")

    if (settings.workers or default_workers(settings.device)) > 1:  # one engine process, N front-end processes
        raise typer.Exit(serve_workers(settings, settings.workers or default_workers(settings.device), verbose,
                                       on_ready=ready))
    try:
        with err.status(f"loading {settings.model} (a first run downloads it; ~2 GB for the default model)"):
            stt = load(settings)
    except ModelLoadError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2)
    err.print(f"loaded {settings.model}; warming up the engine ({settings.slots} slots on {stt.device})...",
              highlight=False)

    run_server(settings, stt, on_ready=ready)


def _check_port(host: str, port: int) -> None:
    """Say now, not after loading and warming the model (a minute on a CPU), that the port is taken. The probe
    binds as uvicorn does (SO_REUSEADDR) and lets go at once."""
    import socket

    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            err.print(f"[red]error:[/red] cannot listen on {host}:{port}: {exc.strerror or exc} (another server "
                      f"there? --port or KYUTAI_STT_PORT picks another)", highlight=False)
            raise typer.Exit(2)


@app.command("make-checkpoint")
def make_checkpoint(
    folder: Path = typer.Argument(..., help="Where to write the checkpoint."),
    size: str = typer.Option("tiny", help="tiny (about a minute to build on 2 cores; tests), small, or 1b (stt-1b-en_fr architecture)."),
    seed: int = typer.Option(0, help="Random seed."),
    family: str = typer.Option("kyutai", help="kyutai, or nemo (NVIDIA's cache-aware streaming FastConformer: "
                               "--size tiny or 0.6b; needs the nemo extra), or sortformer (the streaming "
                               "diarizer for --diarizer: --size tiny or full)."),
    head: str = typer.Option("ctc", help="--family nemo: the decoder head, ctc or rnnt."),
) -> None:
    """Write a RANDOM-WEIGHT checkpoint in the real layout. It produces meaningless text: tests and benchmarks only."""
    import time

    from rich.progress import SpinnerColumn, TimeElapsedColumn

    if family == "nemo":
        from kyutai_stt.engine.nemo.checkpoint import SIZES as NEMO_SIZES, make_checkpoint as build_nemo

        if size not in NEMO_SIZES:
            err.print(f"[red]error:[/red] --size must be one of {', '.join(NEMO_SIZES)} with --family nemo")
            raise typer.Exit(2)
        _logging(False)
        start = time.monotonic()
        if head not in ("ctc", "rnnt"):
            err.print("[red]error:[/red] --head must be ctc or rnnt")
            raise typer.Exit(2)
        with err.status(f"building a random-weight {size} NeMo checkpoint ({head})"):
            build_nemo(folder, size, seed, head=head)
        err.print(f"wrote a random-weight NeMo {size} checkpoint to {folder} in {time.monotonic() - start:.0f} s "
                  "(it produces MEANINGLESS text)", highlight=False)
        return
    if family == "sortformer":  # the streaming diarizer (--diarizer DIR)
        from kyutai_stt.engine.diarization.sortformer import SIZES as SORTFORMER_SIZES, make_checkpoint as build_diar

        if size not in SORTFORMER_SIZES:
            err.print(f"[red]error:[/red] --size must be one of {', '.join(SORTFORMER_SIZES)} with --family sortformer")
            raise typer.Exit(2)
        _logging(False)
        start = time.monotonic()
        with err.status(f"building a random-weight {size} Sortformer diarizer"):
            build_diar(folder, size, seed)
        err.print(f"wrote a random-weight Sortformer {size} diarizer to {folder} in {time.monotonic() - start:.0f} s "
                  "(serve it with --diarizer; its speakers are MEANINGLESS)", highlight=False)
        return
    if family != "kyutai":
        err.print("[red]error:[/red] --family must be kyutai, nemo or sortformer")
        raise typer.Exit(2)
    from kyutai_stt.engine.kyutai.testing_checkpoint import SIZES, make_checkpoint as build, progress_steps

    _logging(False)
    if size not in SIZES:
        err.print(f"[red]error:[/red] --size must be one of {', '.join(SIZES)}")
        raise typer.Exit(2)
    logging.getLogger("kyutai_stt.engine.kyutai.testing_checkpoint").setLevel(logging.WARNING)  # the bar says it
    start = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("training a sentencepiece tokenizer", total=progress_steps(size))
        build(folder, size, seed, progress=lambda description: progress.update(task, advance=1,
                                                                               description=description))
    err.print(f"wrote a random-weight {size} checkpoint to {folder} in {time.monotonic() - start:.0f} s "
              "(it produces MEANINGLESS text)", highlight=False)


@app.command()
def transcribe(
    files: list[Path] = typer.Argument(None, help="Audio files (wav, mp3, flac, ogg)."),
    mic: bool = typer.Option(False, "--mic", help="Transcribe the default microphone until Ctrl+C."),
    url: Optional[str] = typer.Option(None, help="Transcribe through a running server (e.g. ws://127.0.0.1:8000)."),
    protocol: str = typer.Option("events", help="With --url: events (JSON, default), kyutai (moshi-server msgpack), seed (Opus, text only)."),
    realtime: bool = typer.Option(False, help="Send the audio at real-time pace, as a live stream would."),
    format: str = typer.Option("text", "--format", "-f", help="text (timestamped words as they come), json, srt, vtt."),
    model: Optional[str] = typer.Option(None, help="In-process: HF repo id or local checkpoint folder."),
    device: Optional[str] = typer.Option(None, help="In-process: auto, cpu, cuda."),
    dtype: Optional[str] = typer.Option(None, help="In-process: auto, bfloat16, float16, float32."),
    api_key: Optional[str] = typer.Option(None, envvar="KYUTAI_STT_API_KEY", help="With --url: API key."),
) -> None:
    """Transcribe files, printing words with timestamps as they are recognised."""
    from kyutai_stt.audio.decode import AudioFormatError, load_audio_file
    from kyutai_stt.audio.constants import SAMPLE_RATE
    from kyutai_stt.engine.contract import ModelLoadError
    from kyutai_stt.messages.events import Step, Text, Word, WordEnd
    from kyutai_stt.stream.formats import render
    from kyutai_stt.stream.words import pair_words

    _logging(False)
    files = list(files or [])
    if format not in ("text", "json", "srt", "vtt"):
        err.print("[red]error:[/red] --format must be text, json, srt or vtt")
        raise typer.Exit(2)
    if protocol not in ("events", "kyutai", "seed"):
        err.print("[red]error:[/red] --protocol must be events, kyutai or seed")
        raise typer.Exit(2)
    if protocol == "seed" and url and format in ("srt", "vtt"):
        err.print("[red]error:[/red] the seed protocol sends text without timestamps: use --format text or json")
        raise typer.Exit(2)
    if mic == bool(files):
        err.print("[red]error:[/red] give audio files, or --mic (not both)")
        raise typer.Exit(2)
    if mic:
        from kyutai_stt.audio.microphone import MicrophoneError, microphone

        try:
            audios = [microphone()]
        except MicrophoneError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
        files = [Path("microphone")]
        err.print("listening to the microphone; Ctrl+C to stop")
    else:
        try:
            audios = [load_audio_file(f) for f in files]
        except (FileNotFoundError, AudioFormatError) as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)

    def duration(audio) -> float:
        return len(audio) / SAMPLE_RATE if hasattr(audio, "__len__") else 0.0

    events: list[list] = [[] for _ in files]
    text_only = bool(url) and protocol == "seed"  # text pieces, no words nor times
    many = len(files) > 1
    show_progress = err.is_terminal and not realtime and not mic
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                        TimeRemainingColumn(), console=err, disable=not show_progress)
    tasks = [progress.add_task(f.name, total=duration(a)) for f, a in zip(files, audios)]

    def show(index: int, line: str) -> None:
        line = f"{files[index].name}: {line}" if many else line
        progress.console.print(line, highlight=False, soft_wrap=True) if show_progress else print(line, flush=True)

    def on_event(index: int, event) -> None:
        events[index].append(event)
        if isinstance(event, Step):
            progress.update(tasks[index], completed=min(duration(audios[index]), (event.step_idx + 1) * 0.08))
        elif isinstance(event, Word) and format == "text":
            show(index, f"[{event.start_time:8.2f}] {event.text}")
        elif isinstance(event, Text) and text_only and format == "text":  # seed: its pieces, no times
            show(index, event.text.strip())

    async def run_remote() -> None:
        from kyutai_stt.client import stream_events
        from kyutai_stt.stream.transcribe import run_many

        source = partial(stream_events, url, realtime=realtime, steps=True, api_key=api_key, protocol=protocol)
        await run_many([(a, source) for a in audios], on_event)

    async def run_local() -> None:
        from kyutai_stt.engine.startup import load, start_engine
        from kyutai_stt.stream.transcribe import run_many, session_events

        settings = _settings(model=model, device=device, dtype=dtype)
        progress.console.print(f"loading {settings.model}...", highlight=False)
        stt = await asyncio.to_thread(load, settings)
        if stt.random_weights:
            progress.console.print(f"[yellow]warning:[/yellow] {settings.model} has RANDOM WEIGHTS (made by "
                                   "make-checkpoint): the text below is meaningless", highlight=False)
        engine = await asyncio.to_thread(start_engine, settings, stt, slots=min(len(audios), 64))
        try:
            source = partial(session_events, engine, realtime=realtime,
                             end_of_turn_threshold=settings.end_of_turn_threshold)
            await run_many([(a, source) for a in audios], on_event)
        finally:
            engine.stop()

    async def run() -> None:
        if mic:
            # Ctrl+C ends the microphone's stream: the words still due are flushed and printed. A second Ctrl+C
            # stops at once.
            loop = asyncio.get_running_loop()

            def stop_listening() -> None:
                loop.remove_signal_handler(signal.SIGINT)
                err.print("stopping: transcribing the last words (Ctrl+C again to quit now)")
                audios[0].stop()

            loop.add_signal_handler(signal.SIGINT, stop_listening)
        await (run_remote() if url else run_local())

    try:
        with progress:
            asyncio.run(run())
    except KeyboardInterrupt:
        err.print("stopped")
    except ModelLoadError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    except (OSError, RuntimeError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)

    if format != "text":
        for index, file in enumerate(files):
            words = pair_words(e for e in events[index] if isinstance(e, (Word, WordEnd)))
            if many:
                print(f"==> {file} <==")
            if text_only:  # json: the text the pieces spell, no words
                text = "".join(e.text for e in events[index] if isinstance(e, Text)).strip()
                print(json.dumps({"text": text, "words": [], "duration": round(duration(audios[index]), 3)},
                                 ensure_ascii=False, indent=2))
                continue
            print(render(format, words, duration=round(duration(audios[index]), 3)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
