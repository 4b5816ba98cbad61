"""Logging set-up: readable text on a terminal, or one JSON object per line for log collectors."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import warnings

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra}``; extras such as ``session_id`` become fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


_QUERY = re.compile(r"(/[^\s?\"']*)\?[^\s\"']*")  # a path's query string


class NoQueryStrings(logging.Filter):
    """Takes the query strings out of uvicorn's own lines (a WebSocket's "[accepted]" line at INFO, the request
    lines at DEBUG, its access log): a query may carry an API key (``api_key=``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _QUERY.sub(r"\1", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_QUERY.sub(r"\1", a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_uvicorn_logs() -> None:
    """``NoQueryStrings`` on uvicorn's loggers (once per process)."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoQueryStrings) for f in logger.filters):
            logger.addFilter(NoQueryStrings())


def quiet_library_warnings() -> None:
    """Hide warnings that every run printed and no user can act on: torch's "zero-element tensors" (moshi builds
    empty layers for the parts an STT model does not have) and CUDA_HOME notices on machines without CUDA."""
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*CUDA_HOME")
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method. is deprecated", category=DeprecationWarning)


def setup_logging(fmt: str = "text", verbose: bool = False) -> None:
    """Text logs (rich on a terminal; plain, unwrapped lines with a timestamp when stderr is a file or pipe) or
    one JSON object per line."""
    level = logging.DEBUG if verbose else logging.INFO
    quiet_library_warnings()
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif not sys.stderr.isatty():  # rich would wrap long lines at 80 columns in a log file
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
