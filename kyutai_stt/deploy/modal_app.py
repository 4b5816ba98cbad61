"""kyutai-stt on Modal: one GPU container serves many streams in one batch, Modal adds containers past that.

    uv sync --extra modal            # or: pip install 'kyutai-stt[modal]'
    modal deploy -m kyutai_stt.deploy.modal_app
    modal run -m kyutai_stt.deploy.modal_app --audio speech.mp3 --realtime

What it deploys (app ``kyutai-stt`` unless ``KYUTAI_STT_MODAL_APP`` says otherwise):

- ``STT``, a GPU class. Its ``api`` web endpoint is the same FastAPI app as ``kyutai-stt serve`` (``/ws``,
  ``/v1/stream``, ``/status``...), and its ``transcribe_queue`` method streams one audio stream through a
  ``modal.Queue`` (partitions ``"audio"`` and ``"transcription"``, ``None`` ends both ways; see
  ``kyutai_stt.serve.queue_bridge``). One container holds ``slots`` streams (``@modal.concurrent``), every WebSocket
  and every queue call taking one; the model is loaded on CPU before a memory snapshot, moved to the GPU and
  warmed up after it, so a new container starts in seconds and the first user pays no compilation.
- ``ui``, the browser page as its own small web function (no GPU), pointed at ``STT``'s URL.
- A local entrypoint that streams a file through the Queue and prints words as they come.

Deploy-time settings (``ModalSettings``: read from the environment when you deploy, and passed to the containers):

=====================================  ==========  ==============================================================
``KYUTAI_STT_MODAL_APP``               kyutai-stt  App name (the Volume is ``<app>-hf-cache``).
``KYUTAI_STT_MODAL_GPU``               L40S        Modal GPU type (``H100``, ``A10G``, ``L40S:2``...); ``none`` for CPU.
``KYUTAI_STT_SLOTS``                   32          Streams one container serves in one batch (``max_inputs``).
``KYUTAI_STT_MODAL_TARGET_INPUTS``     3/4 slots   Streams per container the autoscaler aims at.
``KYUTAI_STT_MODAL_SCALEDOWN_S``       300         Idle seconds before a container goes away.
``KYUTAI_STT_MODAL_TIMEOUT_S``         3600        Longest single WebSocket or queue call, in seconds.
``KYUTAI_STT_MODAL_STARTUP_TIMEOUT_S`` 1200        Longest container start (the first one downloads the weights).
``KYUTAI_STT_MODAL_MIN_CONTAINERS``    0           Containers kept warm.
``KYUTAI_STT_MODAL_MAX_CONTAINERS``    (none)      Upper bound on containers.
``KYUTAI_STT_MODAL_SECRET``            (none)      Name of a ``modal.Secret`` (``HF_TOKEN``, ``KYUTAI_STT_API_KEYS``).
``KYUTAI_STT_MODAL_SNAPSHOT``          1           ``0`` turns memory snapshots off.
``KYUTAI_STT_MODAL_STT_URL``           (found)     The URL the ``ui`` page connects to (default: ``STT``'s own).
=====================================  ==========  ==============================================================

The service settings of ``kyutai_stt.settings`` (``KYUTAI_STT_MODEL``, ``KYUTAI_STT_IDLE_TIMEOUT_S``...) set when
you deploy are passed on too (``FORWARDED_SETTINGS``), except the API keys, which belong in the Secret.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from importlib import metadata
from pathlib import Path

import modal
from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from typing_extensions import Annotated

from kyutai_stt.settings import Settings

log = logging.getLogger("kyutai_stt.modal")


SlotCount = Annotated[(int, *Settings.model_fields["slots"].metadata)]  # the bounds of Settings.slots


class ModalSettings(BaseSettings):
    """The deploy-time settings (``KYUTAI_STT_MODAL_*``, and ``KYUTAI_STT_SLOTS`` with ``Settings``' own bounds)."""

    model_config = SettingsConfigDict(env_prefix="KYUTAI_STT_MODAL_", env_ignore_empty=True, extra="ignore",
                                      populate_by_name=True)

    app: str = "kyutai-stt"
    gpu: str = "L40S"  # "none" or "cpu": no GPU
    slots: SlotCount = Field(
        32, validation_alias=AliasChoices("KYUTAI_STT_SLOTS", "slots"))
    target_inputs: int | None = Field(None, ge=1)  # default: 3/4 of the slots
    scaledown_s: int = Field(300, ge=0)
    timeout_s: int = Field(3600, gt=0)
    startup_timeout_s: int = Field(1200, gt=0)
    min_containers: int | None = Field(None, ge=0)
    max_containers: int | None = Field(None, ge=1)
    secret: str | None = None
    snapshot: bool = True

    @model_validator(mode="after")
    def _target_within_slots(self) -> "ModalSettings":
        if self.target_inputs is None:
            self.target_inputs = max(1, self.slots * 3 // 4)
        if not 1 <= self.target_inputs <= self.slots:
            raise ValueError(f"KYUTAI_STT_MODAL_TARGET_INPUTS={self.target_inputs}: must be between 1 and the "
                             f"{self.slots} slots")
        return self

    @property
    def gpu_type(self) -> str | None:
        return None if self.gpu.lower() in ("none", "cpu") else self.gpu


# ---------------------------------------------------------------------------------------- deploy-time settings
MODAL = ModalSettings()
APP_NAME = MODAL.app
GPU: str | None = MODAL.gpu_type
SLOTS: int = MODAL.slots
TARGET_INPUTS: int = MODAL.target_inputs
SCALEDOWN_WINDOW_S: int = MODAL.scaledown_s
TIMEOUT_S: int = MODAL.timeout_s
STARTUP_TIMEOUT_S: int = MODAL.startup_timeout_s
MIN_CONTAINERS: int | None = MODAL.min_containers
MAX_CONTAINERS: int | None = MODAL.max_containers
SECRET_NAME = MODAL.secret
SNAPSHOT = MODAL.snapshot

# Service settings passed on from the deploying machine to the containers (``KYUTAI_STT_<NAME>``). Not passed:
# host/port (Modal serves the app), device (the container picks its GPU), record_dir (a local path), api_keys
# (put them in the Secret, not in the function definition).
FORWARDED_SETTINGS = (
    "model", "dtype", "flush_seconds", "end_of_turn_threshold", "cors_origins", "idle_timeout_s",
    "ping_interval_s", "max_session_s", "max_message_bytes", "max_buffered_audio_s", "max_upload_bytes",
)

CONTAINER_ENV: dict[str, str] = {
    "KYUTAI_STT_SLOTS": str(SLOTS),
    "KYUTAI_STT_MODAL_APP": APP_NAME,
    "KYUTAI_STT_MODAL_GPU": GPU or "none",
    "KYUTAI_STT_MODAL_TARGET_INPUTS": str(TARGET_INPUTS),
    "KYUTAI_STT_MODAL_SCALEDOWN_S": str(SCALEDOWN_WINDOW_S),
    "KYUTAI_STT_MODAL_TIMEOUT_S": str(TIMEOUT_S),
    "KYUTAI_STT_MODAL_STARTUP_TIMEOUT_S": str(STARTUP_TIMEOUT_S),
    "KYUTAI_STT_MODAL_SNAPSHOT": "1" if SNAPSHOT else "0",
}
for _var in ("KYUTAI_STT_MODAL_MIN_CONTAINERS", "KYUTAI_STT_MODAL_MAX_CONTAINERS", "KYUTAI_STT_MODAL_SECRET",
             "KYUTAI_STT_MODAL_STT_URL", *(f"KYUTAI_STT_{s.upper()}" for s in FORWARDED_SETTINGS)):
    if os.environ.get(_var, "").strip():
        CONTAINER_ENV[_var] = os.environ[_var].strip()

# ---------------------------------------------------------------------------------------- image and storage
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
PACKAGE = "kyutai_stt"
DISTRIBUTION = "kyutai-stt"
# moshi pins torch<2.10 but runs on newer torch (pyproject's [tool.uv] override): it is installed without its
# dependencies, which are installed (pinned) with ours; sounddevice and bitsandbytes are never used here.
NO_DEPS_PACKAGES = ("moshi",)
SKIPPED_PACKAGES = ("sounddevice", "bitsandbytes", "modal")
UI_PACKAGES = ("python-fasthtml",)  # the browser page (the package declares it once the page lands)

HF_CACHE_VOLUME = f"{APP_NAME}-hf-cache"
HF_CACHE_PATH = "/root/.cache/huggingface"
FRONTEND_DIR = Path(__file__).resolve().parents[2] / "frontend"  # the page's JS and assets (repository)
REMOTE_FRONTEND_DIR = "/root/frontend"
IMAGE_ENV = {
    "HF_HUB_ENABLE_HF_TRANSFER": "1",
    "HF_HOME": HF_CACHE_PATH,
    "PYTHONUNBUFFERED": "1",
}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pin(requirement: str) -> str:
    """``name[extras]==<the version installed here>`` (local labels such as ``+cpu`` dropped), or as declared."""
    name = _name(requirement)
    extras = re.match(r"[^\[;]*(\[[^\]]*\])", requirement)
    try:
        version = metadata.version(name).split("+", 1)[0]
    except metadata.PackageNotFoundError:
        return requirement.split(";", 1)[0].strip()
    return f"{name}{extras.group(1) if extras else ''}=={version}"


def pinned_requirements() -> tuple[list[str], list[str]]:
    """What the image installs: (our dependencies and moshi's, each pinned to the version installed here, which is
    the version the tests ran against; the packages installed without their dependencies).

    torch is pinned to its release (the CUDA wheel on Linux), whatever local build the deploying machine has.
    """
    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:  # inside a container: the image is already built
        return [], []
    requirements = [r for r in declared if "extra ==" not in r]
    for package in NO_DEPS_PACKAGES:
        try:
            requirements += [r for r in metadata.requires(package) or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError:
            pass
    with_deps: dict[str, str] = {}
    no_deps: list[str] = []
    for requirement in [*requirements, *UI_PACKAGES]:
        name = _normal(_name(requirement))
        if name in SKIPPED_PACKAGES or name in with_deps:
            continue
        if name in NO_DEPS_PACKAGES:
            if _pin(requirement) not in no_deps:
                no_deps.append(_pin(requirement))
            continue
        with_deps[name] = _pin(requirement)
    return sorted(with_deps.values()), no_deps


PIP_PACKAGES, NO_DEPS_PIP_PACKAGES = pinned_requirements()
FRONTEND_INCLUDED = FRONTEND_DIR.is_dir()

def nemo_requirements() -> list[str]:
    """NVIDIA's family is an extra: the image installs it (pinned as here) only when the deployed model is one."""
    from kyutai_stt.engine.startup import family
    from kyutai_stt.settings import Settings

    if family(Settings().model) != "nemo":
        return []
    try:
        return [f"nemo-toolkit[asr]=={metadata.version('nemo-toolkit')}"]
    except metadata.PackageNotFoundError:  # inside a container, or the extra is not installed here
        return []


image = modal.Image.debian_slim(python_version=PYTHON_VERSION)
if PIP_PACKAGES:
    image = image.uv_pip_install(*PIP_PACKAGES, *nemo_requirements())
if NO_DEPS_PIP_PACKAGES:
    image = image.uv_pip_install(*NO_DEPS_PIP_PACKAGES, extra_options="--no-deps")
image = image.env(IMAGE_ENV).add_local_python_source(PACKAGE, ignore=["**/__pycache__/**", "**/*.pyc"])
if FRONTEND_INCLUDED:
    image = image.add_local_dir(FRONTEND_DIR, REMOTE_FRONTEND_DIR)

hf_cache = modal.Volume.from_name(HF_CACHE_VOLUME, create_if_missing=True)
VOLUMES = {HF_CACHE_PATH: hf_cache}
SECRETS = [modal.Secret.from_name(SECRET_NAME)] if SECRET_NAME else []

app = modal.App(APP_NAME, include_source=False)  # the package comes in through the image

STT_OPTIONS = dict(
    image=image,
    gpu=GPU,
    volumes=VOLUMES,
    secrets=SECRETS,
    env=CONTAINER_ENV,
    timeout=TIMEOUT_S,
    startup_timeout=STARTUP_TIMEOUT_S,
    scaledown_window=SCALEDOWN_WINDOW_S,
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    enable_memory_snapshot=SNAPSHOT,
)
CONCURRENCY = dict(max_inputs=SLOTS, target_inputs=TARGET_INPUTS)
UI_CONCURRENCY = dict(max_inputs=1000)


# ---------------------------------------------------------------------------------------- the STT service
def planned_dtype(settings) -> str:
    """The dtype the model will run in, decided before the snapshot (when no GPU is visible yet)."""
    from kyutai_stt.engine.startup import family

    if settings.dtype != "auto":
        return settings.dtype
    if family(settings.model) == "nemo":
        return "float32"  # the NVIDIA family runs in float32
    on_gpu = settings.device.startswith("cuda") or (settings.device == "auto" and GPU is not None)
    return "bfloat16" if on_gpu else "float32"


def move_model(model, device: str):
    """Move a model loaded on CPU to ``device`` (``auto``: the GPU when there is one)."""
    from kyutai_stt.engine.kyutai.checkpoint import resolve_device

    target = resolve_device(device)
    if target != model.device and hasattr(model, "asr"):  # the NVIDIA family: one NeMo model
        model.asr.to(target)
        model.device = target
    elif target != model.device:
        model.mimi.to(target)
        model.lm.to(target)
        model.device = target
    return model


@app.cls(**STT_OPTIONS)
@modal.concurrent(**CONCURRENCY)
class STT:
    """The model, one engine and its slots; served over WebSockets (``api``) and Modal Queues."""

    @modal.enter(snap=SNAPSHOT)
    def load(self) -> None:
        """Before the snapshot: download (into the Volume) and load the weights on CPU."""
        from kyutai_stt.engine.startup import load

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        settings = Settings()
        self.engine = None
        start = time.perf_counter()
        self.model = load(settings.model_copy(update={"dtype": planned_dtype(settings)}), device="cpu")
        log.info("loaded %s on CPU in %.1f s", settings.model, time.perf_counter() - start)

    @modal.enter(snap=False)
    def start(self) -> None:
        """After the snapshot: move to the GPU, build the batched engine, warm it up (CUDA graphs), start it."""
        from kyutai_stt.engine.startup import start_engine

        self.settings = Settings()  # read after the snapshot: the Secret's API keys may have changed since
        self.engine = start_engine(self.settings, move_model(self.model, self.settings.device))

    @modal.exit()
    def stop(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the engine (its worker thread)."""
        if getattr(self, "engine", None) is not None:
            self.engine.stop()
            self.engine = None

    @modal.asgi_app()
    def api(self):
        """The same FastAPI app as ``kyutai-stt serve``, over this container's engine."""
        from kyutai_stt.serve.server import create_app

        return create_app(self.settings, engine=self.engine)

    @modal.method()
    async def transcribe_queue(self, q: modal.Queue, events: bool = False) -> str:
        """Transcribe one stream through ``q`` (see ``kyutai_stt.serve.queue_bridge``); returns the transcript."""
        from kyutai_stt.serve.queue_bridge import transcribe_queue

        return await transcribe_queue(self.engine, q, self.settings, events=events)


# ---------------------------------------------------------------------------------------- the browser page
def stt_web_url() -> str:
    """Where the page connects: ``KYUTAI_STT_MODAL_STT_URL``, else the URL of this app's ``STT.api``."""
    override = os.environ.get("KYUTAI_STT_MODAL_STT_URL", "").strip()
    if override:
        return override.rstrip("/")
    url = None
    try:  # the STT class of the app this container belongs to (so `modal serve` pairs with its own STT)
        url = STT().api.get_web_url()
    except Exception as exc:
        log.info("no web URL from this app's STT class (%s); looking up the deployed app %r", exc, APP_NAME)
    if not url:  # the deployed app of that name
        url = modal.Cls.from_name(APP_NAME, "STT")().api.get_web_url()
    if not url:
        raise RuntimeError(f"the STT class of app {APP_NAME!r} has no web URL: deploy it first")
    return url.rstrip("/")


UI_OPTIONS = dict(image=image, env=CONTAINER_ENV, timeout=TIMEOUT_S, scaledown_window=SCALEDOWN_WINDOW_S)


@app.function(**UI_OPTIONS)  # no GPU, no Secret: the page needs neither
@modal.concurrent(**UI_CONCURRENCY)
@modal.asgi_app()
def ui():
    """The browser page, on a small CPU container: loading it never wakes a GPU."""
    from kyutai_stt.serve.ui import create_ui_app

    return create_ui_app(stt_web_url())


# ---------------------------------------------------------------------------------------- local client
DEFAULT_AUDIO = "https://github.com/kyutai-labs/delayed-streams-modeling/raw/refs/heads/main/audio/bria.mp3"


def _read_source(source: str) -> bytes:
    if re.match(r"^https?://", source):
        from urllib.request import urlopen

        with urlopen(source) as response:  # noqa: S310 - the user names the URL
            return response.read()
    return Path(source).expanduser().read_bytes()


@app.local_entrypoint()
async def main(audio: str = DEFAULT_AUDIO, realtime: bool = False, raw: bool = False, chunk_ms: int = 400):
    """Stream a local file or URL through a Queue to the deployed STT class and print words as they come.

    ``--realtime`` paces the audio as a live stream would; ``--raw`` sends the file's own bytes (decoded on
    the server once they have all arrived) instead of Ogg/Opus pages encoded here.
    """
    from kyutai_stt.audio.decode import opus_chunks
    from kyutai_stt.client import stream_through_queue

    print(f"reading {audio}")
    data = _read_source(audio)
    if raw:
        chunks = [(data[i:i + 24_000], 0.0) for i in range(0, len(data), 24_000)]
    else:
        chunks = opus_chunks(data, max(1, round(chunk_ms / 80)))
    duration = chunks[-1][1] if chunks and not raw else None
    print("streaming" + (" at real-time pace" if realtime and not raw else "") + " (a cold start adds a few seconds)")

    async with modal.Queue.ephemeral() as q:
        start = time.perf_counter()
        call = await STT().transcribe_queue.spawn.aio(q, events=True)
        first_word, _ = await stream_through_queue(q, chunks, realtime=realtime and not raw)
        await call.get.aio()  # raises the service's error, if any
    total = time.perf_counter() - start
    print(f"time to first word: {first_word:.2f} s" if first_word is not None else "no words")
    print(f"total time: {total:.2f} s" + (f" for {duration:.1f} s of audio" if duration else ""))
