"""scripts/gpu_check.py runs end to end on the CPU at small sizes (--quick): parity table and JSON written.

On the CPU the engine's tokens equal the batch-1 reference's; its VAD probabilities are bitwise equal only for a
given engine configuration (tests/test_neighbour_invariance.py), since MKL's kernels depend on the batch size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.scripts  # a script's smoke run: `uv run pytest -m scripts` (CI runs it too)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def test_gpu_check_quick_on_cpu(checkpoint_dir, tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu",
                          "--checkpoint", f"tiny={checkpoint_dir}", "--out", str(tmp_path), "--deadline-s", "400"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| checkpoint | dtype | slots | batch-invariant |" in run.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {(p["slots"], p["mode"]) for p in report["parity"]} == {(2, "on"), (2, "off")}
    for parity in report["parity"]:
        assert parity["error"] is None and parity["tokens"] > 0
        assert parity["tokens_differing"] == 0 and parity["streams_exact"] == parity["streams"]
    assert {c["mode"] for c in report["capacity"]} == {"on", "off"}
