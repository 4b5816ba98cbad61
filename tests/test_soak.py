"""The soak in its short form: 3 lanes for 20 s with random joins and abrupt leaves over every protocol, against
the shared test server; every checked stream must get exactly its reference words (scripts/soak.py runs the long
form, see its docstring)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.scripts  # a script's smoke run: `uv run pytest -m scripts` (CI runs it too)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def load_soak():
    if "kyutai_stt_soak" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kyutai_stt_soak", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["kyutai_stt_soak"]


async def test_soak_short(server, checkpoint_dir, reference, tmp_path):
    soak = load_soak()
    from .test_storm import rss  # the server runs in this process

    config = soak.SoakConfig(url=server.http, model=str(checkpoint_dir), device="cpu", dtype="float32", streams=3,
                             seconds=20, clips=3, clip_seconds=(1.0, 2.5), abrupt=0.25, gap_seconds=(0.0, 1.0),
                             realtime=True, flush_seconds=0.5, seed=1, out=str(tmp_path))
    report = await soak.run_soak(config, outputs=reference.outputs, model=reference.model, rss=rss)
    print("\n" + soak.summary(report))
    streams, words = report["streams"], report["words"]
    assert streams["checked"] >= 3 and streams["abrupt"] >= 1, streams
    assert all(counts["checked"] for counts in streams["by_protocol"].values()), streams["by_protocol"]
    assert words["expected"] > 0 and words["lost"] == 0 and words["wrong"] == 0, report["problems"]
    assert streams["failed"] == 0 and streams["refused"] == 0, report["problems"]
    assert report["server"]["unhealthy_polls"] == 0 and report["server"]["final_status"]["slots_in_use"] == 0
    assert report["latency_s"]["words"] > 0 and report["memory_mib"]["drift_from_start"] is not None
    assert report["ok"]
    assert json.loads((tmp_path / "soak.json").read_text())["ok"] and (tmp_path / "summary.md").exists()


def test_soak_finds_wrong_words():
    """The comparison itself: a lost, a replaced and an extra word are all counted."""
    soak = load_soak()
    want = [("a", 0.0), ("b", 0.5), ("c", 1.0), ("d", 1.5)]
    assert soak.diff(want, want) == (0, 0)
    assert soak.diff(want[:3], want) == (1, 0)
    assert soak.diff([("a", 0.0), ("x", 0.5), ("c", 1.0), ("d", 1.5)], want) == (0, 1)
    assert soak.diff(want + [("e", 2.0)], want) == (0, 1)
    assert soak.diff([("a", 0.0), ("b", 0.6), ("c", 1.0), ("d", 1.5)], want) == (0, 1)  # a timestamp off


def test_long_stream_script_smoke(checkpoint_dir, sounds, tmp_path):
    """scripts/long_stream.py end to end on a short "long" stream (its real run is hours; see BENCHMARKS.md)."""
    import subprocess

    import soundfile

    audio = tmp_path / "speech.wav"
    soundfile.write(audio, sounds(5.0, 31), 24000, subtype="FLOAT")
    script = SCRIPT.parent / "long_stream.py"
    result = subprocess.run([sys.executable, str(script), "--model", str(checkpoint_dir), "--hours", "0.004",
                             "--audio", str(audio), "--neighbour-seconds", "2", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "long_stream.json").read_text())
    assert report["ok"] and report["words_expected"] > 0 and report["lost"] == report["wrong"] == 0
    assert report["steps_received"] == report["steps_expected"] > 14 / 0.08
    assert report["neighbour_streams"] >= 1
