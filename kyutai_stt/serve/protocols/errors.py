"""One map from errors to WebSocket close codes: adapters raise, ``runner.run_stream`` translates.

A client fault carries its close code: its own class (``InvalidPayload``: 1007, ``PolicyViolation``: 1008, ...),
or, for the errors raised below the adapters (audio decoding, session bounds, the engine), the entry of
``CLOSE_CODES`` for the nearest class in its MRO, so a subclass never depends on the order of ``except`` clauses.
Anything else is a server fault: 1011 with a generic reason (the traceback goes to the log, not the client).

Codes: RFC 6455 section 7.4.1 and the IANA WebSocket close code registry.
"""

from __future__ import annotations

import asyncio
from typing import Mapping

from kyutai_stt.audio.errors import AudioFormatError
from kyutai_stt.engine.contract import EngineStopped, NoFreeSlot
from kyutai_stt.messages.errors import MessageError, UnknownMessage
from kyutai_stt.stream.session import SessionLimitError

NORMAL = 1000
GOING_AWAY = 1001
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013

# label of the ``kyutai_stt_errors`` metric for a stream closed with this code
ERROR_KINDS = {UNSUPPORTED_DATA: "unsupported_data", INVALID_PAYLOAD: "invalid_data", POLICY_VIOLATION: "policy",
               TOO_BIG: "too_big", INTERNAL_ERROR: "internal", TRY_AGAIN_LATER: "no_free_slot"}

MAX_REASON = 120  # a close reason must fit in 123 bytes of UTF-8


class CloseSocket(Exception):
    """Close the socket with ``code`` and ``reason``. Raised by an adapter's loops; the subclasses below fix the
    code, e.g. ``raise InvalidPayload("not an Ogg stream")``."""

    code = INTERNAL_ERROR

    def __init__(self, code: int | str, reason: str | None = None):
        if reason is None:  # CloseSocket subclass with its own code: one argument, the reason
            code, reason = type(self).code, str(code)
        super().__init__(reason)
        self.code = int(code)
        self.reason = reason[:MAX_REASON]


class UnsupportedData(CloseSocket):
    """A kind of message this endpoint does not take (text on a binary-only socket). 1003."""

    code = UNSUPPORTED_DATA


class InvalidPayload(CloseSocket):
    """A message that cannot be decoded: malformed JSON/msgpack, corrupt audio, NaN samples. 1007."""

    code = INVALID_PAYLOAD


class PolicyViolation(CloseSocket):
    """A well-formed message or parameter we refuse: unknown control, a bound passed, idle too long. 1008."""

    code = POLICY_VIOLATION


class FinishThenClose(CloseSocket):
    """A close the server chooses although the client did nothing wrong (idle timeout): the audio already
    received is finished first, its words and end are sent, then the socket closes with the code."""


class ServerFault(CloseSocket):
    """The server could not go on with this stream (engine failure, flush stalled). 1011."""

    code = INTERNAL_ERROR


# Errors raised below the adapters, by their nearest class in the MRO. SessionLimitError is a ValueError: the MRO
# walk finds it before any broader entry.
CLOSE_CODES: dict[type[BaseException], int] = {
    AudioFormatError: INVALID_PAYLOAD,
    MessageError: INVALID_PAYLOAD,  # malformed JSON/msgpack, a field of the wrong type
    UnknownMessage: POLICY_VIOLATION,  # well-formed, but no message of the protocol
    SessionLimitError: POLICY_VIOLATION,
    NoFreeSlot: TRY_AGAIN_LATER,
    EngineStopped: INTERNAL_ERROR,
}

# Reasons for errors whose own message is not meant for clients.
_REASONS: dict[type[BaseException], str] = {
    EngineStopped: "the transcription engine is not running",
    asyncio.TimeoutError: "timed out while flushing the stream",
}


def close_for(exc: BaseException, overrides: Mapping[type[BaseException], int] | None = None) -> tuple[int, str]:
    """The close code and reason for an error that ended a stream (1011 "internal error" when unknown).

    ``overrides``: a protocol's own codes for some kinds of error, where its reference service closes them with
    another code (Deepgram closes bad audio with 1008); they take the place of ``CLOSE_CODES``' entries."""
    if isinstance(exc, CloseSocket):
        return exc.code, exc.reason
    codes = {**CLOSE_CODES, **overrides} if overrides else CLOSE_CODES
    for cls in type(exc).__mro__:
        if cls in codes:
            return codes[cls], (_REASONS.get(cls) or str(exc))[:MAX_REASON]
        if cls in _REASONS:
            return INTERNAL_ERROR, _REASONS[cls]
    return INTERNAL_ERROR, "internal error"
