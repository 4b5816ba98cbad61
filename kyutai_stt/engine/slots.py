"""Waiting for a free engine slot from asyncio: the engine's own ``open(timeout=)``, on a thread of its own.

The wait is on the engine's condition variable, so a slot given back is taken at once (no polling). Each waiter
holds one thread for at most ``timeout`` seconds; the number of waiters is bounded by the caller (``queue_max``).
"""

from __future__ import annotations

import asyncio
import threading

from kyutai_stt.engine.contract import DecodingOptions, Engine, NoFreeSlot, Sink, StreamHandle


async def open_when_free(engine: Engine, sink: Sink, timeout: float,
                         options: DecodingOptions | None = None) -> StreamHandle:
    """``engine.open(sink)``, waiting up to ``timeout`` seconds for a free slot without blocking the event loop.

    Raises ``NoFreeSlot`` after the wait, ``EngineStopped`` if the engine stops. If the awaiting task is cancelled,
    a slot the wait takes afterwards is given back at once."""
    try:
        return engine.open(sink, options=options)
    except NoFreeSlot:
        if timeout <= 0:
            raise
    loop = asyncio.get_running_loop()
    future: asyncio.Future[StreamHandle] = loop.create_future()

    def settle(handle: StreamHandle | None, exc: BaseException | None) -> None:  # event-loop thread
        if future.cancelled():
            if handle is not None:
                engine.abort(handle)  # nobody is waiting for it any more
        elif exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(handle)

    def wait() -> None:  # its own thread
        handle, error = None, None
        try:
            handle = engine.open(sink, timeout=timeout, options=options)
        except BaseException as exc:  # NoFreeSlot, EngineStopped: handed to the awaiting task
            error = exc
        try:
            loop.call_soon_threadsafe(settle, handle, error)
        except RuntimeError:  # the event loop is closed: nobody is waiting
            if handle is not None:
                engine.abort(handle)

    threading.Thread(target=wait, name="kyutai-stt-slot-wait", daemon=True).start()
    return await future
