"""scripts/bench_frontend.py runs end to end at tiny scale: a 2-worker server, real-time Opus clients from a load
generator process, the search, the per-thread CPU accounting (the GPU benchmark is the same command, larger)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.scripts  # a script's smoke run: `uv run pytest -m scripts` (CI runs it too)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1200)
def test_bench_frontend_smoke(checkpoint_dir, tmp_path):
    out = tmp_path / "e2e.json"
    run = subprocess.run(
        [sys.executable, "scripts/bench_frontend.py", "--model", str(checkpoint_dir), "--workers", "2",
         "--clients-start", "2", "--clients-max", "2", "--seconds", "2", "--ramp", "0.2", "--loadgen-procs", "2",
         "--client-timeout", "600",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1100)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    (server,) = report["runs"]
    assert "error" not in server, server
    (probe,) = server["probes"]
    assert probe["clients"] == 2 and probe["completed"] == 2 and probe["error_count"] == 0
    assert probe["frames_lost"] == 0  # a step event came for every audio frame sent
    assert probe["words"] > 0 and probe["word_latency_beyond_delay_ms"]["p99"] is not None
    cpu = probe["cpu_s_per_audio_s_per_stream"]
    for kind in ("event loop", "ipc (worker side)", "ipc (engine side)", "engine worker"):
        assert kind in cpu, cpu
    assert probe["front_end_streams_per_core"] > 0
    assert "| workers | clients |" in run.stdout
