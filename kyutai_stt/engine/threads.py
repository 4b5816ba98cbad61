"""Naming OS threads, so the CPU time of each can be told apart from outside (top -H, py-spy,
``scripts/bench_frontend.py``)."""

from __future__ import annotations

import threading


def name_os_thread(name: str) -> None:
    """Give the calling thread a kernel-visible name (``/proc/<pid>/task/<tid>/comm``). Linux only; a no-op
    elsewhere."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass
