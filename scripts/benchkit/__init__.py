"""The subcommands of ``scripts/bench.py``, one module each (engine, capacity, seed, e2e, loadgen), and what they
share: ``common`` (statistics, machine description, options), ``memory`` (streaming state per stream),
``engine_run`` (the real Engine driven back to back or at real-time pace)."""
