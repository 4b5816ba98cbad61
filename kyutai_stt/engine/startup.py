"""One start-up: the engine built, warmed up and started from ``Settings``, the same way everywhere.

The server, the engine process of ``serve --workers``, the Modal app, ``kyutai-stt transcribe`` (whose sessions
``stream.transcribe`` runs) and the in-process API (``stream.local.SpeechToText``) all call ``start_engine``, so they
share one set of defaults (``Settings``). A second model family is chosen here (by the checkpoint it is given), and nowhere else.
"""

from __future__ import annotations

import logging
import os
import time

from kyutai_stt.engine.contract import Engine
from kyutai_stt.settings import Settings

log = logging.getLogger(__name__)


def device_type(device: str) -> str:
    """What ``device`` (a ``Settings.device``: auto, cpu, cuda, cuda:N) resolves to here: "cuda" or "cpu"."""
    from kyutai_stt.engine.kyutai.checkpoint import resolve_device

    return resolve_device(device).type


def family(model: str) -> str:
    """The engine family of a ``--model``: "nemo" for NVIDIA's ``.nemo`` checkpoints and ``nvidia/`` hub ids,
    else "kyutai". Only the path's shape is read: NeMo is an optional extra, imported only to serve its models."""
    from pathlib import Path

    path = Path(model)
    if path.suffix == ".nemo" or model.startswith("nvidia/"):
        return "nemo"
    if path.is_dir() and (any(path.glob("*.nemo")) or (path / "model_config.yaml").exists()):
        return "nemo"
    return "kyutai"


def load(settings: Settings, device: str | None = None):
    """The model named by ``settings`` (weights on ``device``, default ``settings.device``), not yet served.

    Raises ``ModelLoadError`` (a message for the user) when it cannot be found or loaded."""
    if family(settings.model) == "nemo":
        from kyutai_stt.engine.nemo.checkpoint import load_model as load_nemo

        return load_nemo(settings.model, device or settings.device, settings.dtype, settings.nemo_lookahead)
    from kyutai_stt.engine.kyutai.checkpoint import load_model

    return load_model(settings.model, device or settings.device, settings.dtype)


def start_diarizer(settings: Settings):
    """The streaming diarizer ``settings.diarizer`` names, started (None when it names none). Sortformer needs the
    ``nemo`` extra; ``ModelLoadError`` when it is missing or the model cannot be loaded."""
    if not settings.diarizer:
        return None
    from kyutai_stt.engine.contract import ModelLoadError

    try:
        from kyutai_stt.engine.diarization.sortformer import SortformerDiarizer, load_sortformer
    except ImportError as exc:
        raise ModelLoadError(f"the diarizer needs the nemo extra (pip install 'kyutai-stt[nemo]'): {exc}") from None
    start = time.perf_counter()
    device = device_type(settings.device)
    model = load_sortformer(settings.diarizer, device)
    diarizer = SortformerDiarizer(model, name=settings.diarizer)
    if diarizer.info.random_weights:
        log.warning("diarizer %s has RANDOM WEIGHTS: its speakers are meaningless", settings.diarizer)
    log.info("diarizer ready: %s on %s in %.1f s", settings.diarizer, device, time.perf_counter() - start)
    return diarizer


_TORCH_THREADS: list[int] = []  # torch's own choice, read once (a second start must not take one more away)


def cpu_threads(settings: Settings) -> int | None:
    """The intra-op threads ``settings.threads`` asks for on the CPU (None: leave torch's choice, OMP_NUM_THREADS
    being set). Auto leaves one core to the rest of the server: the engine thread shares the machine with the event
    loop, the audio decoding and, on a small machine, often the clients; torch's threads, which wait for each other
    at every operation, lose more to a busy core than the second thread gains (BENCHMARKS.md, "One core for the
    rest")."""
    import torch

    if settings.threads:
        return settings.threads
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    if not _TORCH_THREADS:
        _TORCH_THREADS.append(torch.get_num_threads())
    return max(1, _TORCH_THREADS[0] - 1)


def set_cpu_threads(settings: Settings) -> int | None:
    """Apply ``cpu_threads`` when the model runs on the CPU (process-wide: torch has one pool); the threads then
    (None on a GPU)."""
    import torch

    if device_type(settings.device) != "cpu":
        return None
    threads = cpu_threads(settings)
    if threads is not None:
        if threads > (os.cpu_count() or threads):
            log.warning("%d CPU threads for %d cores: threads beyond the cores only wait for each other "
                        "(KYUTAI_STT_THREADS)", threads, os.cpu_count())
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def start_engine(settings: Settings, model=None, *, slots: int | None = None) -> Engine:
    """Build the engine for ``settings`` (over ``model`` when it is already loaded), warm it up and start it.

    ``slots``: override ``settings.slots`` (a CLI run sized to its files). The caller stops the engine."""
    start = time.perf_counter()
    model = model if model is not None else load(settings)
    threads = set_cpu_threads(settings)
    if family(settings.model) == "nemo":
        from kyutai_stt.engine.nemo.engine import Engine as NemoEngine

        engine = NemoEngine(model, slots or settings.slots)  # steps one chunk (lookahead + 1 frames) at a time
    else:
        from kyutai_stt.engine.kyutai.engine import Engine as KyutaiEngine, default_frames_per_step

        frames = settings.frames_per_step or default_frames_per_step(model.device)
        engine = KyutaiEngine(model, slots or settings.slots, flush_seconds=settings.flush_seconds,
                              frames_per_step=frames, keyterm_boost=settings.keyterm_boost,
                              lane_slots=settings.lane_slots, max_frames_per_step=settings.max_frames_per_step)
    engine.warmup()  # before any stream: the first steps compile (CUDA graphs) and allocate
    engine.start()
    info = engine.info
    if info.random_weights:
        log.warning("%s has RANDOM WEIGHTS: it produces meaningless text", info.name)
    log.info("engine ready: %s on %s (%s), %d slots, %d frame(s) per step, in %.1f s%s", info.name, info.device,
             info.dtype, engine.batch_size, info.frames_per_step, time.perf_counter() - start,
             f", {threads} CPU thread(s)" if threads else "")
    return engine

