"""Shared fixtures: one tiny random checkpoint per run, reference computations, a real server on loopback."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.reference import reference_outputs
from kyutai_stt.serve.server import uvicorn_config
from kyutai_stt.settings import Settings
from kyutai_stt.engine.kyutai.testing_checkpoint import make_checkpoint, synthetic_sounds

FLUSH_SECONDS = 0.5
# The tests compare every engine (batch of `slots` rows) with the batch-1 reference loop, bit for bit. On the CPU
# that needs the batch-invariant mode (oneDNN's convolutions are chosen by batch size: see engine.batch_invariant);
# set here, before any engine or server starts, so servers started as subprocesses inherit it too.
os.environ.setdefault("KYUTAI_STT_BATCH_INVARIANT", "on")
# the scripts' shared harness (scripts/harness.py): the tests drive engines and scripts with it too
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
CASES = Path(__file__).resolve().parent / "cases"  # small real-world inputs that once showed a fault (README there)
BRIA = Path(__file__).resolve().parent / "fixtures" / "bria.opus"  # 28 s of real speech (source, licence: README there)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint, made once per run (or reused from KYUTAI_STT_TEST_CHECKPOINT)."""
    cached = os.environ.get("KYUTAI_STT_TEST_CHECKPOINT")
    if cached:
        folder = Path(cached)
        if not (folder / "config.json").exists():
            make_checkpoint(folder, "tiny")
        return folder
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")


@pytest.fixture(scope="session")
def reference_model(checkpoint_dir):
    """A model instance used only by the single-stream reference (moshi keeps streaming state on modules)."""
    return load_model(str(checkpoint_dir), "cpu", "float32")


class ReferenceOutputs(list):
    """Reference step outputs, and the length of the audio they transcribe (times never pass it)."""

    audio_seconds: float


class Reference:
    def __init__(self, model):
        self.model = model
        self._cache: dict[bytes, list] = {}

    def outputs(self, pcm: np.ndarray, **decoding):
        """``decoding``: ``options``, ``keyterm_boost``, ``resets``, ``mimi_frames_per_call`` of ``reference_outputs``
        (frames per Mimi call: by default 2, the servers' ``frames_per_step`` on CPU, so the arithmetic is theirs)."""
        key = np.asarray(pcm, np.float32).tobytes() + repr(sorted(decoding.items())).encode()
        if key not in self._cache:
            outputs = ReferenceOutputs(reference_outputs(self.model, pcm, FLUSH_SECONDS, **decoding))
            outputs.audio_seconds = np.asarray(pcm).size / 24000
            self._cache[key] = outputs
        return self._cache[key]

    def tokens(self, pcm: np.ndarray, **decoding) -> list[int]:
        return [o.token for o in self.outputs(pcm, **decoding)]


@pytest.fixture(scope="session")
def reference(reference_model) -> Reference:
    return Reference(reference_model)


@pytest.fixture(scope="session")
def sounds():
    """Different synthetic speech-like clips, seeded."""
    def make(seconds: float, seed: int) -> np.ndarray:
        return synthetic_sounds(seconds, 1000 + seed)
    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, app, port: int):
        self.app = app
        self.port = port
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"
        settings = app.state.service.settings
        # uvicorn as `kyutai-stt serve` configures it (keepalive, message cap), on this port
        config = uvicorn_config(app, settings.model_copy(update={"host": "127.0.0.1", "port": port}))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.service.engine


def start_server(checkpoint_dir, **overrides) -> RunningServer:
    from kyutai_stt.serve.server import create_app

    settings = Settings(model=str(checkpoint_dir), device="cpu", dtype="float32", flush_seconds=FLUSH_SECONDS, **overrides)
    model = load_model(str(checkpoint_dir), "cpu", "float32")
    return RunningServer(create_app(settings, model), free_port())


@pytest.fixture(scope="session")
def server(checkpoint_dir):
    """The real server (uvicorn, FastAPI) on loopback with the tiny checkpoint and 8 slots."""
    with start_server(checkpoint_dir, slots=8) as running:
        yield running


def ensure_debian_packages(*commands_and_packages: tuple[str, str]) -> bool:
    """Install Debian packages whose command is missing (CI runs as root); True when all commands exist."""
    import shutil
    import subprocess

    missing = [pkg for cmd, pkg in commands_and_packages if shutil.which(cmd) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True, timeout=900)
    return all(shutil.which(cmd) for cmd, _ in commands_and_packages)


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> np.ndarray:
    """Generated English speech (espeak-ng) at 24 kHz mono, installed on demand."""
    import subprocess

    from kyutai_stt.audio.decode import load_audio_file

    assert ensure_debian_packages(("espeak-ng", "espeak-ng")), "espeak-ng is needed to generate speech"
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "-s", "160",
                    "The quick brown fox jumps over the lazy dog. Streaming speech recognition."], check=True)
    return load_audio_file(path)


@pytest.fixture(scope="session")
def bria() -> np.ndarray:
    """Real English speech at 24 kHz mono: the first 28 s of Kyutai's bria.mp3 sample."""
    from kyutai_stt.audio.decode import load_audio_file

    return load_audio_file(BRIA)
