"""The one error a wire message that does not parse raises, whatever the protocol."""

from __future__ import annotations

from pydantic import ValidationError


class MessageError(ValueError):
    """A client message that is not valid for its protocol (malformed bytes or a wrong field). Closes with 1007."""


class UnknownMessage(MessageError):
    """A well-formed message the protocol does not define (or not with these fields). Closes with 1008."""


def first_error(exc: ValidationError) -> str:
    """The first problem pydantic found, in words: a validator's own message, else pydantic's with the field."""
    error = exc.errors(include_url=False)[0]
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]
