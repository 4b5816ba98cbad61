"""The kyutai-stt command as a user runs it: transcribe in-process and through a server give the same words."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import soundfile

from kyutai_stt.audio.decode import load_audio_file

from .conftest import FLUSH_SECONDS
from .helpers import expected_words


def kyutai_stt(*args: str) -> subprocess.CompletedProcess:
    # the flush the tests' servers and reference use (the default is now the minimal one: the delay + one frame)
    env = {**os.environ, "KYUTAI_STT_FLUSH_SECONDS": str(FLUSH_SECONDS)}
    return subprocess.run([sys.executable, "-m", "kyutai_stt.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_transcribe_in_process_and_via_url_agree_with_reference(tmp_path, checkpoint_dir, server, reference, sounds):
    clips = [sounds(1.8, 11), sounds(1.1, 12)]
    paths = []
    for i, clip in enumerate(clips):
        path = tmp_path / f"clip{i}.wav"
        soundfile.write(path, clip, 24000, subtype="FLOAT")
        paths.append(str(path))

    local = kyutai_stt("transcribe", *paths, "--model", str(checkpoint_dir), "--device", "cpu", "--format", "json")
    assert local.returncode == 0, local.stderr
    remote = kyutai_stt("transcribe", *paths, "--url", server.ws, "--format", "json")
    assert remote.returncode == 0, remote.stderr

    def parse(stdout: str) -> list[dict]:
        docs = [chunk for chunk in stdout.split("==> ") if chunk.strip()]
        return [json.loads(doc.split(" <==\n", 1)[1]) for doc in docs]

    local_docs, remote_docs = parse(local.stdout), parse(remote.stdout)
    assert local_docs == remote_docs
    for doc, path in zip(local_docs, paths):
        want = expected_words(reference.model, reference.outputs(load_audio_file(path)))
        assert [(w["text"], w["start"], w["end"]) for w in doc["words"]] == [
            (w.text, round(w.start, 3), round(w.end, 3)) for w in want]


def test_transcribe_text_format_prints_timestamped_words(tmp_path, server, reference, sounds):
    clip = sounds(1.5, 13)
    path = tmp_path / "clip.wav"
    soundfile.write(path, clip, 24000, subtype="FLOAT")
    result = kyutai_stt("transcribe", str(path), "--url", server.ws)
    assert result.returncode == 0, result.stderr
    want = expected_words(reference.model, reference.outputs(load_audio_file(path)))
    assert result.stdout.splitlines() == [f"[{w.start:8.2f}] {w.text}" for w in want]


def test_transcribe_over_the_seed_protocol_prints_its_text(tmp_path, server, reference, sounds):
    """The seed protocol (Opus in, text pieces out, no times): the pieces as they come, the text they spell in
    json; srt and vtt, which need times, are refused. (Both printed nothing before: they read words only.)"""
    from .helpers import expected_pieces, opus_pages_and_decoded

    clip = sounds(1.5, 13)
    path = tmp_path / "clip.wav"
    soundfile.write(path, clip, 24000, subtype="FLOAT")
    _, decoded = opus_pages_and_decoded(load_audio_file(str(path)))
    pieces = expected_pieces(reference.model, reference.outputs(decoded))
    assert pieces
    args = ("transcribe", str(path), "--url", server.ws, "--protocol", "seed", "--format")
    text, as_json, srt = kyutai_stt(*args, "text"), kyutai_stt(*args, "json"), kyutai_stt(*args, "srt")
    assert text.returncode == 0 and text.stdout.splitlines() == [p.strip() for p in pieces]
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["text"] == "".join(pieces).strip()
    assert srt.returncode == 2 and "without timestamps" in srt.stderr


def test_serve_on_a_taken_port_says_so_before_loading(tmp_path):
    """The port is checked first: the error comes at once, not after the model has loaded (the folder given is
    not even a checkpoint)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = kyutai_stt("serve", "--model", str(tmp_path), "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr.replace("\n", " ")


def test_transcribe_reports_missing_file_and_unreachable_hub(tmp_path):
    missing = kyutai_stt("transcribe", str(tmp_path / "nope.wav"))
    assert missing.returncode == 2 and "no such audio file" in missing.stderr
    wav = tmp_path / "a.wav"
    soundfile.write(wav, [0.0] * 2400, 24000)
    hub = kyutai_stt("transcribe", str(wav), "--model", "kyutai/definitely-not-reachable")
    assert hub.returncode == 2
    assert "--model /path/to/folder" in hub.stderr.replace("\n", " ")


def test_mic_ctrl_c_flushes_the_last_words(tmp_path, server, reference, sounds):
    """``transcribe --mic``: Ctrl+C ends the stream and the words still due are printed, exactly the reference's
    over what the microphone delivered. The microphone is a stand-in for PortAudio (tests/fake_sounddevice) that
    plays a WAV file at real time; everything else is the real CLI, client and server."""
    import os
    import signal
    import time
    from pathlib import Path

    import numpy as np

    clip = sounds(3.0, 14)
    wav, log = tmp_path / "mic.wav", tmp_path / "delivered"
    soundfile.write(wav, clip, 24000, subtype="FLOAT")
    fake = Path(__file__).parent / "fake_sounddevice"
    env = dict(os.environ, FAKE_MIC_WAV=str(wav), FAKE_MIC_LOG=str(log),
               PYTHONPATH=os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-m", "kyutai_stt.cli", "transcribe", "--mic", "--url", server.ws,
                                "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not Path(str(log) + ".started").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)
        time.sleep(2.0)  # mid-speech: words are still due when Ctrl+C comes
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "transcribing the last words" in stderr
    delivered = int(log.read_text())
    heard = np.zeros(delivered, np.float32)
    heard[:min(delivered, len(clip))] = clip[:delivered]
    assert 1.0 * 24000 < delivered < 3.0 * 24000
    want = expected_words(reference.model, reference.outputs(heard))
    assert want and [(w["text"], w["start"], w["end"]) for w in json.loads(stdout)["words"]] == [
        (w.text, round(w.start, 3), round(w.end, 3)) for w in want]


def test_a_setting_out_of_range_is_a_usage_error_not_a_traceback():
    result = kyutai_stt("serve", "--threads", "-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--threads / KYUTAI_STT_THREADS" in " ".join(result.stderr.split()), result.stderr


def test_cpu_threads_leave_a_core_to_the_rest_of_the_server(monkeypatch):
    import torch

    from kyutai_stt.engine import startup
    from kyutai_stt.settings import Settings

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, auto in ((1, 1), (2, 1), (16, 15)):
        monkeypatch.setattr(startup, "_TORCH_THREADS", [cores])
        assert startup.cpu_threads(Settings(device="cpu")) == auto
        assert startup.cpu_threads(Settings(device="cpu", threads=3)) == 3  # asked for: as asked
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert startup.cpu_threads(Settings(device="cpu")) is None  # the environment's choice stands
    assert startup.cpu_threads(Settings(device="cpu", threads=1)) == 1

    before = torch.get_num_threads()
    try:
        assert startup.set_cpu_threads(Settings(device="cpu", threads=1)) == 1 == torch.get_num_threads()
        # a second start-up in the same process takes no more away (torch's own choice is read once)
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(startup, "_TORCH_THREADS", [])
        torch.set_num_threads(4)
        assert startup.set_cpu_threads(Settings(device="cpu")) == 3
        assert startup.set_cpu_threads(Settings(device="cpu")) == 3
    finally:
        torch.set_num_threads(before)
