"""Smoke test of scripts/bench.py: the `engine` subcommand at tiny scale, the capacity search logic, and the
back-to-back run of the real Engine (full batches however slow the pushes; a stalled engine fails fast)."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytestmark = pytest.mark.scripts  # a script's smoke run: `uv run pytest -m scripts` (CI runs it too)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kyutai_stt_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # puts scripts/ on sys.path: the benchkit package imports from here on
    return module


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady on a shared machine (2 threads stall badly when the cores are busy)
    yield
    torch.set_num_threads(threads)  # the setting is process-wide: leave it as other tests expect


def test_search_max_finds_the_largest_passing_size(bench):
    from benchkit.common import search_max

    for limit in (0, 1, 2, 3, 5, 8, 13, 64, 100):
        tried: list[int] = []

        def passes(n: int, tried=tried, limit=limit) -> bool:
            tried.append(n)
            return n <= limit

        best, order = search_max(passes, 1, 100)
        assert best == limit
        assert order == tried
        assert len(set(tried)) == len(tried)  # never probes a size twice
    best, _ = search_max(lambda n: n <= 37, 1, 1000, resolution=8)
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
        for part in ("step_ms", "mimi_ms", "lm_ms", "host_ms", "engine_step_ms"):  # all from the real Engine
            assert r[part]["count"] == 3, part
            assert 0 < r[part]["p50"] <= r[part]["p99"] <= r[part]["max"], part
        # the parts are measured inside the step: they cannot add up to more than it
        assert r["mimi_ms"]["p50"] + r["lm_ms"]["p50"] <= r["step_ms"]["max"]
        assert set(r["host_parts_ms_p50"]) == {"plan", "prepare", "d2h", "deliver"}
        assert r["realtime_ok"] == (r["step_ms"]["p99"] <= 80.0)
    ok = [r["batch"] for r in data["results"] if r["realtime_ok"]]
    assert data["summary"]["max_realtime_batch_measured"] == (max(ok) if ok else 0)

    # per-stream streaming state, measured, against the sizes computed from the config
    config = json.loads((checkpoint_dir / "config.json").read_text())
    from benchkit.memory import formula_state_memory

    formula = formula_state_memory(config, 4)
    mem = data["memory"]
    assert mem["lm_bytes_per_stream"] == pytest.approx(formula["lm_kv_bytes_per_stream"], rel=0.01)
    encoder_kv = formula["mimi_encoder_kv_bytes_per_stream"]
    assert mem["mimi_by_part"]["encoder_transformer"] == pytest.approx(encoder_kv, rel=0.01)
    assert mem["mimi_bytes_per_stream"] >= formula["mimi_encoder_kv_bytes_per_stream"]


def test_back_to_back_steps_full_batches_however_slow_the_pushes(bench, checkpoint_dir, one_thread):
    """The H200 "hang": pushing stream after stream while the engine steps let the first streams run ahead, so
    fewer full-batch steps came than frames pushed and the wait for them never ended. A 0.3 s gap between pushes
    (several tiny-model steps) reproduces that drift here; the bench must still get exactly its full steps."""
    from benchkit.common import audio_pool
    from benchkit.engine_run import run_engine

    from kyutai_stt.engine.kyutai.checkpoint import load_model

    stt = load_model(str(checkpoint_dir), "cpu", "float32")
    batch, warmup, steps = 4, 1, 4
    t = time.monotonic()
    run = run_engine(stt, batch, steps, warmup, audio_pool(2, 2.0), push_gap_s=0.3, stall_s=20.0, timing=True)
    assert run.full_steps == warmup + steps  # every frame pushed went in a full batch
    assert run.all_steps == warmup + steps  # and no partial step at all
    assert len(run.step_s) == steps and len(run.timings) == steps
    for timing in run.timings:  # the engine's own part timings of the same steps
        assert timing.frames == batch
        assert 0 < timing.mimi + timing.lm <= timing.seconds
    assert time.monotonic() - t < 60


def test_a_stalled_engine_fails_fast_with_the_counts(bench):
    from benchkit.engine_run import EngineStalled, wait_full_steps

    progress = threading.Condition()
    counts = {"all": 3, "full": 2, "frames": 8}
    t = time.monotonic()
    with pytest.raises(EngineStalled, match=r"no engine step for 0.2 s \(batch 4: 3 steps, 2 with every slot, "
                                            r"8 of 20 frames stepped; 5 full steps needed\)"):
        wait_full_steps(progress, counts, 5, 20, 0.2, 4)
    assert time.monotonic() - t < 5

    # the engine keeps stepping but the streams ran dry before enough full steps: fail at once, not at the stall
    def dry_steps() -> None:
        for _ in range(4):
            time.sleep(0.05)
            with progress:
                counts["all"] += 1
                counts["frames"] += 3
                progress.notify_all()

    counts.update({"all": 0, "full": 0, "frames": 8})
    feeder = threading.Thread(target=dry_steps)
    feeder.start()
    with pytest.raises(EngineStalled, match="ran out of audio"):
        wait_full_steps(progress, counts, 5, 20, 30.0, 4)
    feeder.join()
