"""The Modal app, offline: its definition, and its STT class run here on the tiny checkpoint (no Modal account).

The class's enter hooks and web app run through Modal's own ``.local()`` path; ``transcribe_queue`` runs against
an in-memory queue with modal.Queue's ``get``/``put(partition=...)`` interface (and its ``.aio`` variants). Every
transcript must equal the single-stream reference for the audio the service decoded.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import queue as std_queue
import subprocess
import sys
import threading
import time
import warnings
from importlib import metadata

import numpy as np
import pytest

modal = pytest.importorskip("modal", reason="the Modal client is an optional dependency (uv sync --extra modal)")

from kyutai_stt import client as stt_client
from kyutai_stt.deploy import modal_app  # noqa: E402
from kyutai_stt.audio.decode import OggOpusDecoder, encode_ogg_opus, load_audio_bytes, opus_chunks  # noqa: E402
from kyutai_stt.messages.events import Text, Word, WordEnd  # noqa: E402
from kyutai_stt.settings import Settings  # noqa: E402

from .conftest import FLUSH_SECONDS  # noqa: E402
from .helpers import expected_events  # noqa: E402


# ------------------------------------------------------------------------------------------- helpers
def reference_events(reference, pcm: np.ndarray) -> list:
    """The Text/Word/WordEnd events a stream must produce: the reference tokens through the word assembler (times
    capped at the end of the audio, as the session does)."""
    return expected_events(reference.model, reference.outputs(pcm))


def dumped(events, kinds=(Text, Word, WordEnd)) -> list[dict]:
    return [e.model_dump() for e in events if isinstance(e, kinds)]


@pytest.fixture(scope="module")
def speech(sounds):
    """Ogg/Opus pages of a short clip, and the PCM the service decodes from them (one reference for both tests)."""
    pages = encode_ogg_opus(sounds(1.5, 12))
    decoder = OggOpusDecoder()
    return pages, np.concatenate([decoder.feed(page) for page in pages])


class _Method:
    """A blocking call with an ``.aio`` coroutine variant, the shape of modal.Queue's methods."""

    def __init__(self, blocking, aio):
        self._blocking, self.aio = blocking, aio

    def __call__(self, *args, **kwargs):
        return self._blocking(*args, **kwargs)


class MemoryQueue:
    """An in-memory stand-in for modal.Queue: partitions, ``get(block, timeout, *, partition)`` raising
    ``queue.Empty`` on timeout, ``put(v, block, timeout, *, partition)`` raising ``queue.Full`` when full."""

    def __init__(self, maxsize: int = 0):
        self._maxsize = maxsize
        self._partitions: dict[str | None, std_queue.Queue] = {}
        self._lock = threading.Lock()
        self.get = _Method(self._get, self._get_aio)
        self.put = _Method(self._put, self._put_aio)

    def partition(self, name: str | None) -> std_queue.Queue:
        with self._lock:
            return self._partitions.setdefault(name, std_queue.Queue(self._maxsize))

    def _get(self, block: bool = True, timeout: float | None = None, *, partition: str | None = None):
        try:
            return self.partition(partition).get(block, timeout)
        except std_queue.Empty:
            if block:
                raise
            return None

    def _put(self, v, block: bool = True, timeout: float | None = None, *, partition: str | None = None,
             partition_ttl: int = 86400) -> None:
        self.partition(partition).put(v, block, timeout)

    async def _get_aio(self, *args, **kwargs):
        return await asyncio.to_thread(self._get, *args, **kwargs)

    async def _put_aio(self, *args, **kwargs):
        return await asyncio.to_thread(self._put, *args, **kwargs)

    def drain(self, partition: str) -> list:
        items = []
        while True:
            try:
                items.append(self.partition(partition).get_nowait())
            except std_queue.Empty:
                return items


# ------------------------------------------------------------------------------------------- definition
def test_app_registers_stt_class_ui_and_entrypoint():
    assert isinstance(modal_app.app, modal.App)
    assert modal_app.app.name == modal_app.APP_NAME == "kyutai-stt"
    assert isinstance(modal_app.STT, modal.Cls)
    assert isinstance(modal_app.ui, modal.Function)
    assert callable(modal_app.main)
    stt = modal_app.STT()
    for method in ("api", "transcribe_queue"):
        assert isinstance(getattr(stt, method), modal.Function), method


def test_default_gpu_concurrency_and_timeouts():
    assert modal_app.STT_OPTIONS["gpu"] == modal_app.GPU == "L40S"
    assert modal_app.CONCURRENCY == {"max_inputs": 32, "target_inputs": 24}
    assert modal_app.STT_OPTIONS["enable_memory_snapshot"] is True
    assert modal_app.STT_OPTIONS["scaledown_window"] == 300
    assert modal_app.STT_OPTIONS["timeout"] == 3600
    assert modal_app.CONTAINER_ENV["KYUTAI_STT_SLOTS"] == "32"
    # the Volume holds the Hugging Face cache
    assert set(modal_app.VOLUMES) == {modal_app.HF_CACHE_PATH} == {"/root/.cache/huggingface"}
    assert isinstance(modal_app.VOLUMES[modal_app.HF_CACHE_PATH], modal.Volume)
    assert modal_app.STT_OPTIONS["volumes"] is modal_app.VOLUMES
    assert modal_app.SECRETS == []  # a Secret only when named
    assert "gpu" not in modal_app.UI_OPTIONS and modal_app.UI_CONCURRENCY == {"max_inputs": 1000}


def test_image_pins_every_dependency_to_the_tested_version():
    assert isinstance(modal_app.image, modal.Image)
    assert modal_app.PYTHON_VERSION == f"{sys.version_info.major}.{sys.version_info.minor}"
    pins = {modal_app._normal(modal_app._name(p)): p for p in modal_app.PIP_PACKAGES}
    declared = [r for r in metadata.requires("kyutai-stt") if "extra ==" not in r]
    for requirement in declared:
        name = modal_app._normal(modal_app._name(requirement))
        version = metadata.version(name).split("+")[0]
        if name in modal_app.SKIPPED_PACKAGES:  # the microphone's sounddevice: no microphone in a container
            assert name not in pins
        elif name == "moshi":  # installed without its torch<2.10 pin
            assert modal_app.NO_DEPS_PIP_PACKAGES == [f"moshi=={version}"]
            assert name not in pins
        else:
            assert pins[name].endswith(f"=={version}"), (name, pins[name])
    assert pins["torch"] == f"torch=={metadata.version('torch').split('+')[0]}"  # the release, not a +cpu build
    assert pins["uvicorn"].startswith("uvicorn[standard]==")
    for moshi_dep in ("einops", "aiohttp"):  # moshi's own dependencies come pinned with ours
        assert pins[moshi_dep] == f"{moshi_dep}=={metadata.version(moshi_dep)}"
    assert "sounddevice" not in pins and "bitsandbytes" not in pins and "modal" not in pins
    assert "python-fasthtml" in pins  # the page
    assert modal_app.IMAGE_ENV["HF_HUB_ENABLE_HF_TRANSFER"] == "1"
    assert modal_app.PACKAGE == "kyutai_stt"
    assert modal_app.FRONTEND_INCLUDED == modal_app.FRONTEND_DIR.is_dir()


def test_inside_a_container_the_image_is_not_recomputed(monkeypatch):
    """In a container the package is source, not an installed distribution: no pins, and no error."""
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(modal_app.metadata, "requires", missing)
    assert modal_app.pinned_requirements() == ([], [])


def test_settings_come_from_the_environment_at_deploy_time():
    env = {**os.environ, "KYUTAI_STT_MODAL_GPU": "H100", "KYUTAI_STT_SLOTS": "64",
           "KYUTAI_STT_MODAL_TARGET_INPUTS": "40", "KYUTAI_STT_MODAL_SCALEDOWN_S": "60",
           "KYUTAI_STT_MODAL_TIMEOUT_S": "7200", "KYUTAI_STT_MODAL_SECRET": "kyutai-stt-secrets",
           "KYUTAI_STT_MODAL_APP": "stt-test", "KYUTAI_STT_IDLE_TIMEOUT_S": "12",
           "KYUTAI_STT_API_KEYS": "not-forwarded", "KYUTAI_STT_DEVICE": "cpu"}
    code = (
        "import json; import kyutai_stt.deploy.modal_app as m; "
        "print(json.dumps({'gpu': m.STT_OPTIONS['gpu'], 'concurrency': m.CONCURRENCY, "
        "'scaledown': m.STT_OPTIONS['scaledown_window'], 'timeout': m.STT_OPTIONS['timeout'], "
        "'env': m.CONTAINER_ENV, 'secrets': len(m.STT_OPTIONS['secrets']), 'app': m.app.name, "
        "'volume': m.HF_CACHE_VOLUME}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["gpu"] == "H100"
    assert got["concurrency"] == {"max_inputs": 64, "target_inputs": 40}
    assert (got["scaledown"], got["timeout"], got["secrets"]) == (60, 7200, 1)
    assert (got["app"], got["volume"]) == ("stt-test", "stt-test-hf-cache")
    # the containers read the same values, and the service settings set here
    assert got["env"]["KYUTAI_STT_SLOTS"] == "64" and got["env"]["KYUTAI_STT_MODAL_GPU"] == "H100"
    assert got["env"]["KYUTAI_STT_IDLE_TIMEOUT_S"] == "12"
    assert "KYUTAI_STT_API_KEYS" not in got["env"] and "KYUTAI_STT_DEVICE" not in got["env"]
    # a target above the slots is refused at deploy time
    env["KYUTAI_STT_MODAL_TARGET_INPUTS"] = "65"
    out = subprocess.run([sys.executable, "-c", "import kyutai_stt.deploy.modal_app"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "TARGET_INPUTS" in out.stderr


def test_forwarded_settings_are_settings_fields():
    assert set(modal_app.FORWARDED_SETTINGS) <= set(Settings.model_fields)
    assert "api_keys" not in modal_app.FORWARDED_SETTINGS


def test_planned_dtype():
    assert modal_app.planned_dtype(Settings(device="auto", dtype="auto")) == "bfloat16"  # GPU configured
    assert modal_app.planned_dtype(Settings(device="cpu", dtype="auto")) == "float32"
    assert modal_app.planned_dtype(Settings(device="cuda", dtype="float16")) == "float16"


# ------------------------------------------------------------------------------------------- the class, locally
@pytest.fixture(scope="module")
def stt(checkpoint_dir):
    """The STT class through Modal's local path: the enter hooks (load on CPU, then engine) and the web app."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"KYUTAI_STT_MODEL": str(checkpoint_dir), "KYUTAI_STT_DEVICE": "cpu",
                           "KYUTAI_STT_DTYPE": "float32", "KYUTAI_STT_SLOTS": "2",
                           "KYUTAI_STT_FLUSH_SECONDS": str(FLUSH_SECONDS), "KYUTAI_STT_IDLE_TIMEOUT_S": "5"}.items():
            mp.setenv(key, value)
        obj = modal_app.STT()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "executing locally ... will not have access to the mounted Volume"
            web_app = obj.api.local()
        yield obj, web_app
        obj.close()


def test_enter_hooks_build_engine_and_web_app(stt):
    obj, web_app = stt
    engine = obj.engine
    assert engine is not None and engine.alive and engine.batch_size == 2
    assert obj.model.device.type == "cpu"
    assert web_app.state.service.engine is engine  # the web app and the queue method share one engine
    from starlette.testclient import TestClient

    with TestClient(web_app) as client:
        status = client.get("/status").json()
    assert status["healthy"] and status["slots_total"] == 2 and status["random_weights"]
    assert engine.alive  # the app's lifespan leaves the shared engine running


def test_websocket_words_equal_reference(stt, reference, speech):
    from starlette.testclient import TestClient

    _, web_app = stt
    pcm = speech[1]
    expected = dumped(reference_events(reference, pcm), (Word, WordEnd))
    assert any(e["type"] == "word" for e in expected), "the reference has no words: pick other audio"
    got = []
    with TestClient(web_app) as client:
        with client.websocket_connect("/v1/stream?format=pcm_f32le&sample_rate=24000") as ws:
            for start in range(0, len(pcm), 4000):
                ws.send_bytes(pcm[start:start + 4000].astype("<f4").tobytes())
            ws.send_text(json.dumps({"type": "end"}))
            while True:
                event = json.loads(ws.receive_text())
                got.append(event)
                if event["type"] in ("end", "error"):
                    break
    assert got[-1]["type"] == "end", got[-1]
    assert [e for e in got if e["type"] in ("word", "word_end")] == expected


async def _run_queue(obj, q, chunks, *, events: bool, end: bool = True):
    for chunk in chunks:
        q.put(chunk, partition="audio")
    if end:
        q.put(None, partition="audio")
    return await asyncio.wait_for(obj.transcribe_queue.local(q, events=events), timeout=120)


async def test_transcribe_queue_ogg_opus_events_equal_reference(stt, reference, speech):
    obj, _ = stt
    pages, decoded = speech
    chunks = [b"".join(pages[i:i + 3]) for i in range(0, len(pages), 3)]  # pages in any grouping
    expected = reference_events(reference, decoded)
    assert any(isinstance(e, Word) for e in expected), "the reference has no words: pick other audio"
    q = MemoryQueue()
    text = await _run_queue(obj, q, chunks, events=True)
    items = q.drain("transcription")
    assert items[-1] is None and None not in items[:-1]
    got = items[:-1]
    assert got[0] == {"type": "ready"} and got[-1]["type"] == "end"
    assert [e for e in got if e["type"] in ("text", "word", "word_end")] == dumped(expected)
    assert text == "".join(e.text for e in expected if isinstance(e, Text)).strip()
    assert obj.engine.stats().slots_in_use == 0


async def test_transcribe_queue_file_pieces_text_equal_reference(stt, reference, sounds):
    """Pieces of an 8 kHz WAV file: gathered, decoded, resampled to 24 kHz; text pieces as in Modal's example."""
    import soundfile

    obj, _ = stt
    buffer = io.BytesIO()
    soundfile.write(buffer, sounds(1.2, 13)[::3].copy(), 8000, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()
    decoded = load_audio_bytes(data)
    assert abs(len(decoded) - 1.2 * 24000) < 2400  # 1.2 s resampled from 8 kHz to 24 kHz
    expected = [e.text for e in reference_events(reference, decoded) if isinstance(e, Text)]
    assert expected, "the reference has no text: pick other audio"
    q = MemoryQueue()
    text = await _run_queue(obj, q, [data[i:i + 1000] for i in range(0, len(data), 1000)], events=False)
    items = q.drain("transcription")
    assert items == [*expected, None]
    assert text == "".join(expected).strip()


async def test_transcribe_queue_frees_the_slot_of_a_vanished_client(stt, sounds):
    from kyutai_stt.serve.queue_bridge import transcribe_queue

    obj, _ = stt
    q = MemoryQueue()
    q.put(encode_ogg_opus(sounds(0.5, 14))[0], partition="audio")  # then nothing, and no None
    start = time.monotonic()
    settings = obj.settings.model_copy(update={"idle_timeout_s": 0.3})
    await asyncio.wait_for(transcribe_queue(obj.engine, q, settings, events=True), timeout=30)
    assert time.monotonic() - start < 10
    assert obj.engine.stats().slots_in_use == 0
    items = q.drain("transcription")
    assert items[-1] is None and items[-2]["type"] == "error" and "no audio" in items[-2]["message"]


async def test_transcribe_queue_rejects_bad_audio(stt):
    from kyutai_stt.audio.decode import AudioFormatError

    obj, _ = stt
    q = MemoryQueue()
    with pytest.raises(AudioFormatError):
        await _run_queue(obj, q, [b"this is not audio at all, not even a little"], events=True)
    items = q.drain("transcription")
    assert items[-1] is None and items[-2]["type"] == "error"
    assert obj.engine.stats().slots_in_use == 0


def test_ui_points_at_the_configured_stt_url(monkeypatch):
    pytest.importorskip("kyutai_stt.serve.ui", reason="the browser page is not in this tree yet")
    from starlette.testclient import TestClient

    monkeypatch.setenv("KYUTAI_STT_MODAL_STT_URL", "https://example--kyutai-stt-stt-api.modal.run/")
    assert modal_app.stt_web_url() == "https://example--kyutai-stt-stt-api.modal.run"
    with TestClient(modal_app.ui.local()) as client:
        assert client.get("/").status_code == 200


async def test_local_entrypoint_client_prints_the_reference_words(stt, reference, sounds):
    """The entrypoint's client half (file -> Ogg/Opus pages -> Queue -> printed words) against the service."""
    import soundfile

    obj, _ = stt
    buffer = io.BytesIO()
    soundfile.write(buffer, sounds(1.5, 12), 24000, format="WAV", subtype="FLOAT")
    chunks = opus_chunks(buffer.getvalue(), pages_per_chunk=5)
    assert [until for _, until in chunks] == sorted(until for _, until in chunks) and chunks[-1][1] == 1.5
    decoder = OggOpusDecoder()
    decoded = np.concatenate([decoder.feed(chunk) for chunk, _ in chunks])
    expected = [e.text for e in reference_events(reference, decoded) if isinstance(e, Word)]
    assert expected, "the reference has no words: pick other audio"

    printed: list[str] = []
    q = MemoryQueue()
    service = asyncio.ensure_future(obj.transcribe_queue.local(q, events=True))
    first_word, received = await asyncio.wait_for(
        stt_client.stream_through_queue(q, chunks, write=lambda *a, **k: printed.append(" ".join(a))), timeout=120)
    await asyncio.wait_for(service, timeout=30)
    assert [e["text"] for e in received if e["type"] == "word"] == expected
    assert [p for p in printed if p] == expected and first_word is not None and first_word > 0
