"""One start-up: the engine built, warmed up and started from ``Settings``, the same way everywhere.

The server, the engine process of ``serve --workers``, the Modal app, ``kyutai-stt transcribe`` (whose sessions
``stream.transcribe`` runs) and the in-process API (``stream.local.SpeechToText``) all call ``start_engine``, so they
share one set of defaults (``Settings``). A second model family is chosen here (by the checkpoint it is given), and nowhere else.
"""

from __future__ import annotations

import logging
import time

from kyutai_stt.engine.contract import Engine
from kyutai_stt.settings import Settings

log = logging.getLogger(__name__)


def device_type(device: str) -> str:
    """What ``device`` (a ``Settings.device``: auto, cpu, cuda, cuda:N) resolves to here: "cuda" or "cpu"."""
    from kyutai_stt.engine.kyutai.checkpoint import resolve_device

    return resolve_device(device).type


def load(settings: Settings, device: str | None = None):
    """The model named by ``settings`` (weights on ``device``, default ``settings.device``), not yet served.

    Raises ``ModelLoadError`` (a message for the user) when it cannot be found or loaded."""
    from kyutai_stt.engine.kyutai.checkpoint import load_model

    return load_model(settings.model, device or settings.device, settings.dtype)


def start_engine(settings: Settings, model=None, *, slots: int | None = None) -> Engine:
    """Build the engine for ``settings`` (over ``model`` when it is already loaded), warm it up and start it.

    ``slots``: override ``settings.slots`` (a CLI run sized to its files). The caller stops the engine."""
    from kyutai_stt.engine.kyutai.engine import Engine as KyutaiEngine, default_frames_per_step

    start = time.perf_counter()
    model = model if model is not None else load(settings)
    frames = settings.frames_per_step or default_frames_per_step(model.device)
    engine = KyutaiEngine(model, slots or settings.slots, flush_seconds=settings.flush_seconds,
                          frames_per_step=frames, keyterm_boost=settings.keyterm_boost)
    engine.warmup()  # before any stream: the first steps compile (CUDA graphs) and allocate
    engine.start()
    info = engine.info
    if info.random_weights:
        log.warning("%s has RANDOM WEIGHTS: it produces meaningless text", info.name)
    log.info("engine ready: %s on %s (%s), %d slots, %d frame(s) per step, in %.1f s", info.name, info.device,
             info.dtype, engine.batch_size, info.frames_per_step, time.perf_counter() - start)
    return engine
