#!/usr/bin/env python
"""Benchmarks for kyutai-stt: engine step time, capacity, the seed-design baseline, end to end over WebSockets.

Every subcommand prints a markdown table on stdout (progress goes to stderr) and, with ``--out FILE``, writes the
same figures as JSON together with a description of the machine (CPU, GPU, torch, load average, git commit, date).
See BENCHMARKS.md for the commands behind each published figure and for the exact definitions.

    uv run python scripts/bench.py engine   --model CKPT --batch 1,2,4,8,16
    uv run python scripts/bench.py capacity --model CKPT
    uv run python scripts/bench.py seed     --model CKPT
    uv run python scripts/bench.py e2e      --model CKPT --clients 8

The real-time budget is one Mimi frame: 80 ms. A batch "keeps real time" when the p99 of its step time is within it.
Each subcommand lives in its own module of ``scripts/benchkit/``; this file only assembles the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # run as a file (uv run python scripts/bench.py) or loaded by path (tests)
    sys.path.insert(0, _HERE)

from benchkit import capacity, e2e, engine, loadgen, seed  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kyutai-stt benchmarks (markdown table on stdout, JSON with --out).")
app.command("engine")(engine.engine)
app.command("capacity")(capacity.capacity)
app.command("seed")(seed.seed)
app.command("e2e")(e2e.e2e)
app.command("loadgen", hidden=True)(loadgen.loadgen)

if __name__ == "__main__":
    app()
