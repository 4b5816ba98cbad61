"""``kyutai-stt serve --workers N``: one engine process, N front-end worker processes, one port.

The launcher (this process) binds the listening socket, starts the engine process (model, device, batched steps;
``engine.ipc.EngineServer``) and waits until it is warmed up, then starts N workers. Each worker inherits the
socket and runs the whole FastAPI app (WebSockets, decoding, resampling, sessions, events) over an
``engine.ipc.EngineClient``; the kernel hands each new connection to one of them.

Supervision: a worker that dies is reported to the engine at once (its slots are freed) and started again; its
own streams are lost, nobody else's. If the engine process dies, workers keep answering ``/status`` with 503 and
refuse streams (1011) until the launcher is stopped. SIGTERM or SIGINT: every worker drains (its streams flush
their last words, ``shutdown_flush_s``), then the engine stops.

Every child gets ``KYUTAI_STT_PROCESS_ROLE`` (``engine``, ``worker-0``...) in its environment, so tools can tell
the processes apart.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from typing import Callable

from kyutai_stt.engine.ipc import EngineClient, EngineServer, Endpoints, tell_engine_worker_gone
from kyutai_stt.serve.metrics import MULTIPROCESS_ENV
from kyutai_stt.settings import Settings

log = logging.getLogger(__name__)

ROLE_ENV = "KYUTAI_STT_PROCESS_ROLE"


def default_workers(device: str) -> int:
    """One per core minus one (for the engine) on CUDA; 1 on CPU, where the engine needs the cores."""
    from kyutai_stt.engine.startup import device_type

    if device_type(device) != "cuda":
        return 1
    return max(1, (os.cpu_count() or 2) - 1)


# ---------------------------------------------------------------------------------------------- children
def _setup_child_logging(settings: Settings, verbose: bool) -> None:
    from kyutai_stt.serve.logs import setup_logging

    setup_logging(settings.log_format, verbose)


def run_engine_process(settings_json: str, endpoints: Endpoints, ready, verbose: bool = False) -> None:
    """The engine process: load the model, warm up, serve it to the workers until SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group; the launcher decides the order
    settings = Settings.model_validate_json(settings_json)
    _setup_child_logging(settings, verbose)
    from kyutai_stt.engine.contract import ModelLoadError
    from kyutai_stt.engine.startup import start_engine
    from kyutai_stt.serve.metrics import Metrics

    try:
        engine = start_engine(settings)
    except ModelLoadError as exc:
        ready.send(("error", str(exc)))
        raise SystemExit(2)
    engine.add_step_listener(Metrics().on_step)  # the step metrics of the whole server, counted once, here
    server = EngineServer(engine, endpoints)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    ready.send(("ready", ""))
    try:
        server.run()
    finally:
        engine.stop()


def run_worker_process(settings_json: str, endpoints: Endpoints, worker_id: str, sock: socket.socket,
                       verbose: bool = False) -> None:
    """A front-end worker: the whole app on the inherited socket, over the engine process."""
    settings = Settings.model_validate_json(settings_json)
    _setup_child_logging(settings, verbose)
    from kyutai_stt.serve.server import GracefulServer, create_app, uvicorn_config

    client = EngineClient(endpoints, worker_id)
    try:
        app = create_app(settings, engine=client)
        GracefulServer(uvicorn_config(app, settings), app).run(sockets=[sock])
    finally:
        client.stop()


# ---------------------------------------------------------------------------------------------- launcher
class Launcher:
    """Starts and supervises the engine process and the workers (``serve_workers`` runs one)."""

    def __init__(self, settings: Settings, workers: int, verbose: bool = False,
                 on_ready: Callable[[], None] | None = None):
        self.on_ready = on_ready
        self.settings = settings
        self.count = workers
        self.verbose = verbose
        self._ctx = multiprocessing.get_context("spawn")  # no fork after torch or zmq threads exist
        self._folder = tempfile.mkdtemp(prefix="kyutai-stt-")
        self.endpoints = Endpoints.in_folder(self._folder)
        self._json = settings.model_dump_json()
        self._stop = False
        self._generation = 0
        self.engine = None
        self.workers: dict[int, tuple[str, multiprocessing.Process]] = {}

    def _spawn(self, role: str, target, *args):
        previous = os.environ.get(ROLE_ENV)
        os.environ[ROLE_ENV] = role  # spawn copies the environment at start
        try:
            process = self._ctx.Process(target=target, args=args, name=f"kyutai-stt-{role}", daemon=False)
            process.start()
        finally:
            if previous is None:
                os.environ.pop(ROLE_ENV, None)
            else:
                os.environ[ROLE_ENV] = previous
        return process

    def _start_worker(self, index: int) -> None:
        self._generation += 1
        worker_id = f"worker-{index}.{self._generation}"
        process = self._spawn(f"worker-{index}", run_worker_process, self._json, self.endpoints, worker_id,
                              self._sock, self.verbose)
        self.workers[index] = (worker_id, process)
        log.info("worker %s started (pid %d)", worker_id, process.pid)

    def run(self) -> int:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()  # now, so it does not inherit a child's role variable
        os.environ.setdefault(MULTIPROCESS_ENV, os.path.join(self._folder, "metrics"))
        os.makedirs(os.environ[MULTIPROCESS_ENV], exist_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        from kyutai_stt.serve.server import uvicorn_config

        config = uvicorn_config(None, self.settings)
        self._sock = config.bind_socket()  # bound here, so the port is taken before anything slow happens
        try:
            ready_recv, ready_send = self._ctx.Pipe(duplex=False)
            self.engine = self._spawn("engine", run_engine_process, self._json, self.endpoints, ready_send,
                                      self.verbose)
            ready_send.close()
            while not self._stop and self.engine.is_alive() and not ready_recv.poll(0.2):
                pass
            if self._stop:
                return 0
            try:
                status, message = ready_recv.recv()
            except EOFError:
                status, message = "error", f"the engine process exited with code {self.engine.exitcode}"
            if status != "ready":
                log.error("engine process failed: %s", message)
                return 2
            for index in range(self.count):
                self._start_worker(index)
            if not self._wait_listening():
                return 0 if self._stop else 2
            log.info("serving on http://%s:%d with %d worker process(es) and one engine process",
                     self.settings.host, self.settings.port, self.count)
            if self.on_ready is not None:
                self.on_ready()
            self._supervise()
            return 0
        finally:
            self._shutdown()
            self._sock.close()
            shutil.rmtree(self._folder, ignore_errors=True)

    def _wait_listening(self) -> bool:
        """Until a worker accepts connections on the port (each listens on the shared socket once its app is up):
        True; False when stopped first, or when every worker died."""
        probe = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.settings.host, self.settings.host)
        while not self._stop:
            if not any(process.is_alive() for _, process in self.workers.values()):
                log.error("every worker process exited before it served")
                return False
            try:
                socket.create_connection((probe, self.settings.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.1)
        return False

    def _on_signal(self, *_):
        self._stop = True

    def _supervise(self) -> None:
        engine_reported = False
        while not self._stop:
            sentinels = [p.sentinel for _, p in self.workers.values()]
            if not engine_reported:
                sentinels.append(self.engine.sentinel)
            wait(sentinels, timeout=0.5)
            if self._stop:
                break
            if not engine_reported and not self.engine.is_alive():
                engine_reported = True
                log.error("the engine process died (exit code %s): every worker answers 503 until restarted",
                          self.engine.exitcode)
            for index, (worker_id, process) in list(self.workers.items()):
                if process.is_alive():
                    continue
                log.error("worker %s died (exit code %s): its streams are lost; starting it again", worker_id,
                          process.exitcode)
                if not engine_reported:
                    tell_engine_worker_gone(self.endpoints, worker_id)
                self._mark_dead(process.pid)
                self._start_worker(index)

    @staticmethod
    def _mark_dead(pid: int) -> None:
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid)
        except OSError:
            pass

    def _shutdown(self) -> None:
        """Workers first (each drains: its streams flush), then the engine."""
        for _, process in self.workers.values():
            if process.is_alive():
                process.terminate()  # SIGTERM: GracefulServer drains
        deadline = time.monotonic() + self.settings.shutdown_flush_s + 10
        for _, process in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker pid %d did not stop in time: killing it", process.pid)
                process.kill()
                process.join(5)
        if self.engine is not None and self.engine.is_alive():
            self.engine.terminate()
            self.engine.join(30)
            if self.engine.is_alive():
                self.engine.kill()
                self.engine.join(5)


def serve_workers(settings: Settings, workers: int, verbose: bool = False,
                  on_ready: Callable[[], None] | None = None) -> int:
    """Run the multi-process server until SIGTERM/SIGINT; returns the exit status. ``on_ready`` is called once a
    worker answers on the port."""
    return Launcher(settings, workers, verbose, on_ready).run()
