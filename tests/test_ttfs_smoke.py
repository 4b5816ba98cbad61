"""Smoke test of scripts/ttfs_bench.py: the plan replays Pipecat's own VAD decisions, the floor counts the right
steps, and one turn per protocol (Pipecat's pipeline and the four light clients) against a real server gets its
finalize acknowledged and measured."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.scripts  # a script's smoke run: `uv run pytest -m scripts` (CI runs it too)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ttfs_bench.py"


@pytest.fixture(scope="module")
def ttfs():
    spec = importlib.util.spec_from_file_location("kyutai_stt_ttfs_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # puts scripts/ on sys.path: ttfskit imports from here on
    return module


def test_plan_replays_pipecats_silero_stops(ttfs):
    """The light clients finalize where Pipecat's SileroVADAnalyzer(stop_secs=0.2) stops: recomputed here."""
    import numpy as np
    from ttfskit import plan

    source = plan.load_source()
    utterances = plan.load()
    assert len(utterances) >= 8
    for u in utterances[:3]:
        padded = np.concatenate([source[u.start:u.start + u.length], np.zeros(48000, np.float32)])
        events = asyncio.run(plan.vad_events(plan.to_rate(padded, plan.VAD_RATE)))
        assert events == [("start", pytest.approx(events[0][1])), ("stop", pytest.approx(u.vad_stop_s, abs=1e-6))]


def test_floor_counts_the_steps_the_last_word_needs(ttfs):
    # stt-1b: 0.5 s delay = 6 frames (config rounding); 0.2 s (2 frames) already sent at the VAD stop; + 1 frame
    assert ttfs.needed_steps(6, 1) == 5
    assert ttfs.needed_steps(6, 2) == 3
    assert ttfs.needed_steps(31, 1) == 30  # stt-2.6b's 2.5 s delay


def test_targets_count_every_turn_measured(ttfs):
    """A run holds only with every turn measured and no error; Pipecat may report more samples than turns (each a
    real finalize's TTFB)."""
    def row(sessions, p99, count, missing=0, errors=0):
        return {"protocol": "pipecat", "sessions": sessions, "turns": 8 * sessions, "floor_s": 0.45,
                "stats": {"p99": p99, "count": count}, "missing": missing, "errors": errors}

    def verdicts(rows):
        return [holds for _, holds in ttfs.targets(rows, "cpu", 3)]

    assert verdicts([row(1, 0.45, 10), row(3, 0.60, 24)]) == [True, True]
    assert verdicts([row(1, 0.45, 8), row(3, 0.70, 24)]) == [True, False]  # 0.70 > 1.5 x 0.45
    assert verdicts([row(1, 0.45, 7, missing=1), row(3, 0.60, 23, missing=1)]) == [False, False]
    assert verdicts([row(1, 0.45, 8, errors=1), row(3, 0.60, 24)]) == [False, True]


def test_one_turn_per_protocol_against_a_real_server(ttfs, checkpoint_dir, tmp_path):
    out = tmp_path / "ttfs.json"
    result = CliRunner().invoke(ttfs.app, [
        "run", "--model", str(checkpoint_dir), "--slots", "1", "--clients", "1", "--utterances", "1",
        "--threads", "1", "--final-timeout", "300", "--out", str(out)])  # function, not speed: wait
    assert result.exit_code == 0, result.output
    assert "| protocol | sessions |" in result.stdout
    data = json.loads(out.read_text())
    assert [r["protocol"] for r in data["rows"]] == ["pipecat", "deepgram", "realtime", "kyutai", "stream"]
    for row in data["rows"]:
        assert row["errors"] == [] and row["missing"] == 0, row
        assert row["stats"]["count"] == row["turns"] == 1, row  # the finalize was acknowledged and measured
        # the final cannot come before the VAD stop, which is stop_secs after the speech end
        assert row["ttfs_s"][0] > 0.2, row
        assert row["steps"] > 0 and row["floor_s"] > 0.2
    # the server's own flush: a positive number of frames, measured (deepgram's serves Pipecat's too)
    assert data["flush_frames"]["deepgram"] > 0 and data["flush_frames"]["realtime"] > 0
    assert data["flush_frames"]["pipecat"] == data["flush_frames"]["deepgram"]
    assert len(data["targets"]) == 5  # one check per protocol with one client
