"""Driving the real ``kyutai_stt.engine.kyutai.engine.Engine`` with N streams, all in use, timed through its step listeners.

Back to back (the engine's throughput): every stream's audio is pushed while the engine's worker is held between
two steps (``WorkerGate``), so all streams start in the same step and every step is a full batch until they all
run out together. Pushing while the worker steps (as this bench once did) lets the first streams run ahead of the
last whenever the push loop outlasts a step: there are then fewer full-batch steps than frames pushed, and a wait
for that many full steps never ends (BENCHMARKS.md, "The back-to-back hang").

Real time: a feeder pushes each stream's next 80 ms frame when it would have been captured.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .common import FRAME_MS, free_device_memory, frames_of, is_oom, now, recover_from_oom, stats_ms


class EngineStalled(RuntimeError):
    """The engine ran no step for ``stall_s`` seconds, or ran out of audio before the steps the bench needs."""


class WorkerGate:
    """A step listener that, while armed, holds the engine's worker after its step (listeners run on the worker
    thread, outside the engine's lock, so pushes and opens still go through while it is held)."""

    def __init__(self, timeout_s: float):
        self._cond = threading.Condition()
        self._armed = False
        self._generation = 0  # bumped by each release
        self.parks = 0  # steps after which the worker was held
        self._timeout_s = timeout_s

    def on_step(self, frames: int, seconds: float, streams: int) -> None:
        with self._cond:
            if not self._armed:
                return
            generation = self._generation
            self.parks += 1
            self._cond.notify_all()
            # never hold the engine for good if the bench itself dies
            self._cond.wait_for(lambda: self._generation != generation, timeout=self._timeout_s)

    def arm(self) -> None:
        with self._cond:
            self._armed = True

    def wait_parks(self, count: int) -> None:
        """Wait until the worker is held after its ``count``-th held step."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.parks >= count, timeout=self._timeout_s):
                raise EngineStalled(f"the engine ran no step for {self._timeout_s:g} s while opening the streams")

    def release(self, rearm: bool) -> None:
        """Let the held worker go; with ``rearm``, hold it again after its next step."""
        with self._cond:
            self._armed = rearm
            self._generation += 1
            self._cond.notify_all()


@dataclass
class EngineRun:
    batch: int
    step_s: list[float]  # measured steps (the Engine's own step time), warm-up dropped
    all_steps: int  # every step the worker ran in the measured window (partial ones too)
    full_steps: int  # steps of the measured window in which every slot stepped
    wall_s: float
    frame_latency_s: list[float]  # realtime pace: push of a frame -> its StepOutput delivered
    max_backlog_frames: float
    timings: list = field(default_factory=list)  # StepTiming of each measured step, with ``timing=True``


def run_engine(stt, batch: int, steps: int, warmup: int, pool: list[np.ndarray], pace: str = "backtoback",
               flush_seconds: float = 0.5, frames_per_step: int = 1, *, timing: bool = False,
               stall_s: float = 10.0, push_gap_s: float = 0.0) -> EngineRun:
    """Drive the real ``Engine`` through its public API with ``batch`` slots, all in use.

    backtoback: ``warmup + steps`` full-batch steps, all audio queued first (see the module docstring).
    realtime: a feeder thread pushes each stream's next 80 ms frame when it would have been captured, stream i
    with a phase offset of i/batch frames (clients are not aligned), as real-time clients do.

    ``timing``: also collect the engine's per-part ``StepTiming`` (it syncs the device between parts).
    ``stall_s``: back to back, no step for this long (or the audio running out before the steps needed) raises
    ``EngineStalled`` with the counts. ``push_gap_s``: a pause between two streams' pushes (tests: a slow push
    loop, as 512 pushes of 0.85 MB are on a busy host).
    """
    from kyutai_stt.audio.constants import FRAME_SIZE
    from kyutai_stt.engine.kyutai.engine import Engine, StepOutput

    total_steps = warmup + steps
    total_frames = total_steps * frames_per_step
    full = batch * frames_per_step
    step_times: list[float] = []
    timings: list = []
    counts = {"all": 0, "full": 0, "frames": 0}
    progress = threading.Condition()
    measuring = {"on": False}

    def on_step(frames: int, seconds: float, streams: int) -> None:
        if not measuring["on"]:
            return
        with progress:
            counts["all"] += 1
            counts["frames"] += frames
            # back to back: full batches only. Real time: every step, since a step costs a full batch whatever
            # the number of slots with a frame.
            if frames == full:
                counts["full"] += 1
            if frames == full or (pace == "realtime" and frames > 0):
                step_times.append(seconds)
            progress.notify_all()

    def on_timing(t) -> None:
        if measuring["on"] and t.frames == full:
            timings.append(t)

    # the step of ``frames_per_step`` frames is what is measured: no bigger steps for a backlog (back to back,
    # every stream is behind, and the engine would otherwise carry up to max_frames_per_step frames a step)
    engine = Engine(stt, batch, flush_seconds=flush_seconds, frames_per_step=frames_per_step,
                    max_frames_per_step=frames_per_step)
    engine.add_step_listener(on_step)
    gate = WorkerGate(timeout_s=max(60.0, stall_s))
    engine.add_step_listener(gate.on_step)
    if timing:
        engine.add_step_timing_listener(on_timing)
    engine.warmup(3)
    engine.start()
    push_times = np.zeros((batch, total_frames))
    deliver_times = np.full((batch, total_frames), np.nan)
    backlog = np.zeros((batch, total_frames))
    prefix = stt.prefix_frames

    def sink_for(i: int):
        def sink(events) -> None:
            t = now()
            for ev in events:
                if isinstance(ev, StepOutput):
                    k = ev.frame - prefix
                    if 0 <= k < total_frames:
                        deliver_times[i, k] = t
                        backlog[i, k] = ev.buffered_samples / FRAME_SIZE
        return sink

    data = [frames_of(pool, i, total_frames) for i in range(batch)]
    handles = []
    start = now()
    try:
        if pace == "backtoback":
            # Step 1 is slot 0's init step; the others open while the worker is held after it, so step 2 inits
            # them all. The audio goes in while the worker is held after step 2: step 3 on are full batches.
            gate.arm()
            handles.append(engine.open(sink_for(0)))
            gate.wait_parks(1)
            handles += [engine.open(sink_for(i)) for i in range(1, batch)]
            if batch > 1:
                gate.release(rearm=True)
                gate.wait_parks(2)
            for i, h in enumerate(handles):
                if push_gap_s and i:
                    time.sleep(push_gap_s)
                engine.push(h, data[i].reshape(-1))
            start = now()
            measuring["on"] = True
            gate.release(rearm=False)
            wait_full_steps(progress, counts, total_steps, batch * total_frames, stall_s, batch)
        else:
            handles = [engine.open(sink_for(i)) for i in range(batch)]
            time.sleep(0.3)  # let the init steps pass
            start = now()
            measuring["on"] = True
            schedule = sorted((start + (k + 1 + i / batch) * FRAME_MS / 1000, i, k)
                              for k in range(total_frames) for i in range(batch))
            for due, i, k in schedule:
                delay = due - now()
                if delay > 0:
                    time.sleep(delay)
                engine.push(handles[i], data[i][k])
                push_times[i, k] = now()
            deadline = now() + 30 + total_frames * FRAME_MS / 1000
            while np.isnan(deliver_times).any() and now() < deadline:
                time.sleep(0.02)
        measuring["on"] = False
        wall = now() - start
    finally:
        gate.release(rearm=False)
        for h in handles:
            engine.abort(h)
        engine.stop()
        del engine
        free_device_memory()
    if pace == "backtoback":
        measured = step_times[warmup:total_steps]
        timings = timings[warmup:total_steps]
        latency: list[float] = []
        max_backlog = 0.0
    else:
        measured = step_times[warmup:]
        lat = (deliver_times - push_times)[:, warmup:]
        latency = [float(x) for x in lat[np.isfinite(lat)]]
        if np.isnan(deliver_times).any():
            latency.append(math.inf)  # frames never delivered: fails any latency bound
        max_backlog = float(backlog[:, warmup:].max())
    return EngineRun(batch, measured, counts["all"], counts["full"], wall, latency, max_backlog, timings)


def wait_full_steps(progress: threading.Condition, counts: dict, needed: int, frames_pushed: int, stall_s: float,
                    batch: int) -> None:
    """Wait for ``needed`` full-batch steps; fail at once, with the counts, when the engine stops stepping for
    ``stall_s`` seconds or has stepped every frame pushed without that many full steps."""
    with progress:
        while counts["full"] < needed:
            seen = counts["all"]
            progress.wait_for(lambda: counts["full"] >= needed or counts["all"] != seen, timeout=stall_s)
            state = (f"batch {batch}: {counts['all']} steps, {counts['full']} with every slot, "
                     f"{counts['frames']} of {frames_pushed} frames stepped; {needed} full steps needed")
            if counts["full"] >= needed:
                return
            if counts["all"] == seen:
                raise EngineStalled(f"no engine step for {stall_s:g} s ({state})")
            if counts["frames"] >= frames_pushed:
                raise EngineStalled(f"the streams ran out of audio before enough full steps ({state})")


def probe_engine(stt, batch: int, steps: int, warmup: int, pool, pace: str, budget_ms: float, percentile: float,
                 frames_per_step: int = 1) -> dict:
    budget_ms = budget_ms * frames_per_step  # a step carries frames_per_step x 80 ms of every stream's audio
    try:
        run = run_engine(stt, batch, steps, warmup, pool, pace, frames_per_step=frames_per_step)
    except (RuntimeError, MemoryError) as exc:
        if not is_oom(exc):
            raise
        recover_from_oom(stt, batch)
        return {"batch": batch, "pace": pace, "step_ms": stats_ms([]), f"step_p{percentile:g}_ms": None,
                "steps_per_second": None, "realtime_ok": False, "error": "out of memory"}
    step = stats_ms(run.step_s)
    p = float(np.percentile(np.asarray(run.step_s) * 1000, percentile)) if run.step_s else math.inf
    result = {"batch": batch, "pace": pace, "step_ms": step, f"step_p{percentile:g}_ms": round(p, 3),
              "steps_per_second": round(run.all_steps / run.wall_s, 2) if run.wall_s else None}
    ok = p <= budget_ms
    if pace == "realtime":
        finite = [x for x in run.frame_latency_s if math.isfinite(x)]
        result["frame_latency_ms"] = stats_ms(finite)
        result["frames_lost"] = len(run.frame_latency_s) - len(finite)
        result["max_backlog_frames"] = run.max_backlog_frames
        lat_p = float(np.percentile(np.asarray(run.frame_latency_s) * 1000, percentile)) if run.frame_latency_s else math.inf
        ok = ok and lat_p <= 2 * budget_ms
    result["realtime_ok"] = bool(ok)
    return result


def timing_summary(timings: list) -> dict:
    """Per-part statistics of ``StepTiming`` records: the step, Mimi, LM, host (the step minus both), and the
    host parts' p50 (plan and deliver lie outside the step's own time)."""
    part = lambda name: stats_ms([getattr(t, name) for t in timings])  # noqa: E731
    return {
        "step_ms": part("seconds"),
        "mimi_ms": part("mimi"),
        "lm_ms": part("lm"),
        "host_ms": stats_ms([t.seconds - t.mimi - t.lm for t in timings]),
        "host_parts_ms_p50": {name: part(name)["p50"] for name in ("plan", "prepare", "d2h", "deliver")},
    }

