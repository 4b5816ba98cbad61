"""Smoke test of scripts/bench.py: the `engine` subcommand at tiny scale, and the capacity search logic."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kyutai_stt_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_search_max_finds_the_largest_passing_size(bench):
    for limit in (0, 1, 2, 3, 5, 8, 13, 64, 100):
        tried: list[int] = []

        def passes(n: int, tried=tried, limit=limit) -> bool:
            tried.append(n)
            return n <= limit

        best, order = bench.search_max(passes, 1, 100)
        assert best == limit
        assert order == tried
        assert len(set(tried)) == len(tried)  # never probes a size twice
    best, _ = bench.search_max(lambda n: n <= 37, 1, 1000, resolution=8)
    assert 37 - 8 < best <= 37


def test_engine_subcommand_writes_consistent_json(bench, checkpoint_dir, tmp_path):
    out = tmp_path / "engine.json"
    threads = torch.get_num_threads()
    try:  # one thread: steady on a shared machine (2 threads stall badly when the cores are busy)
        result = CliRunner().invoke(bench.app, [
            "engine", "--model", str(checkpoint_dir), "--device", "cpu", "--batch", "1,2",
            "--steps", "3", "--warmup", "1", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide: leave it as other tests expect
    assert result.exit_code == 0, result.output
    assert "| batch | step p50 ms |" in result.stdout  # the markdown table

    data = json.loads(out.read_text())
    assert data["command"] == "engine"
    assert {"date_utc", "cpu", "cpu_count", "torch", "loadavg_at_start", "loadavg_at_end"} <= set(data["machine"])
    assert data["config"]["batch"] == [1, 2]
    assert [r["batch"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        for part in ("step_ms", "mimi_ms", "lm_ms", "host_ms", "engine_step_ms"):
            assert r[part]["count"] == 3, part
            assert 0 < r[part]["p50"] <= r[part]["p99"] <= r[part]["max"], part
        # the parts are measured inside the step: they cannot add up to more than it
        assert r["mimi_ms"]["p50"] + r["lm_ms"]["p50"] <= r["step_ms"]["max"]
        assert set(r["host_parts_ms_p50"]) == {"plan", "h2d", "masks", "d2h", "deliver"}
        assert r["realtime_ok"] == (r["step_ms"]["p99"] <= 80.0)
    ok = [r["batch"] for r in data["results"] if r["realtime_ok"]]
    assert data["summary"]["max_realtime_batch_measured"] == (max(ok) if ok else 0)

    # per-stream streaming state, measured, against the sizes computed from the config
    config = json.loads((checkpoint_dir / "config.json").read_text())
    formula = bench.formula_state_memory(config, 4)
    mem = data["memory"]
    assert mem["lm_bytes_per_stream"] == pytest.approx(formula["lm_kv_bytes_per_stream"], rel=0.01)
    encoder_kv = formula["mimi_encoder_kv_bytes_per_stream"]
    assert mem["mimi_by_part"]["encoder_transformer"] == pytest.approx(encoder_kv, rel=0.01)
    assert mem["mimi_bytes_per_stream"] >= formula["mimi_encoder_kv_bytes_per_stream"]
