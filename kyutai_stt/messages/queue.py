"""The Modal Queue protocol's two partitions, and how either side calls a queue. No numpy, no torch: the Python
client's Queue half imports it.

The client puts audio chunks (``bytes``) in partition ``"audio"`` and ``None`` when the audio ends; the service
puts the transcription in partition ``"transcription"`` and ``None`` once every word has been sent: text pieces
(``str``), or with ``events=True`` the events of ``messages.events`` as plain dicts (``{"type": "word", ...}``).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

AUDIO = "audio"
TRANSCRIPTION = "transcription"


async def queue_call(method, *args, **kwargs) -> Any:
    """Call a modal.Queue method (its ``.aio`` variant when it has one), a coroutine function, or a blocking
    function (on a thread)."""
    aio = getattr(method, "aio", None)
    if aio is not None:
        return await aio(*args, **kwargs)
    if inspect.iscoroutinefunction(method):
        return await method(*args, **kwargs)
    return await asyncio.to_thread(method, *args, **kwargs)
