"""The one HTTP upload path: a whole audio file in, its words out, the same for every protocol's POST.

``authorized`` (a FastAPI dependency) checks the API key. ``uploaded_body`` (a dependency; ``read_body`` with a raw
decoder) and ``read_form_file`` (a multipart form's file) cap the size as the bytes arrive, spool them to a
temporary file in chunks (never the whole body in memory, never a copy per chunk) and decode them in a worker
thread, so that a large upload never holds up the event loop the live streams run on. ``transcribe`` (or
``upload_events``) runs a session over the audio, waiting for a slot as ``http_slot_wait_s`` says.

Whatever goes wrong is raised as an ``HttpProblem``; the handler registered once on the app (``serve.server``) has
the route's protocol write it in its own error body (``ProblemRenderer``), chosen by the router the route belongs
to (``routes_rendering``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Literal

import numpy as np
from fastapi import Request, UploadFile
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.audio.decode import AudioFormatError, AudioTooLong, load_audio_file
from kyutai_stt.engine.contract import DecodingOptions
from kyutai_stt.messages.events import Error, Word, WordEnd
from kyutai_stt.serve.auth import is_authorized
from kyutai_stt.serve.service import get_service
from kyutai_stt.stream.transcribe import session_events

log = logging.getLogger(__name__)

SPOOL_IN_MEMORY = 1024 * 1024  # smaller uploads never touch the disk
MULTIPART_OVERHEAD = 64 * 1024  # a form's boundaries and fields, on top of the file it carries
COPY_BLOCK = 1024 * 1024


Reason = Literal["unauthorized", "bad_request", "bad_audio", "too_large", "busy", "failed"]


class HttpProblem(HTTPException):
    """A request refused or failed, said once in our words; the route's protocol writes its error body.

    ``reason``: what happened, for the renderers. ``param`` and ``code``: a protocol's own detail when the
    protocol raised it (OpenAI's ``param``/``code``, Deepgram's ``err_code``). An ``HTTPException``, so that one
    raised while FastAPI reads the body passes through it untouched (FastAPI turns any other error there into
    400 "There was an error parsing the body"), and one without a renderer still answers ``{"detail": message}``.
    """

    def __init__(self, status: int, message: str, reason: Reason = "bad_request", *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.message, self.reason, self.param, self.code = message, reason, param, code


def unauthorized() -> HttpProblem:
    return HttpProblem(401, "missing or invalid API key", "unauthorized")


def server_busy() -> HttpProblem:
    return HttpProblem(503, "all streams are busy, retry later", "busy", headers={"Retry-After": "5"})


def too_large(limit: int, close: bool = True) -> HttpProblem:
    # "Connection: close" while the body is not all read: uvicorn would otherwise keep the connection and read (and
    # drop) the rest of the body, however large, to reuse it for another request
    return HttpProblem(413, f"file larger than {limit} bytes", "too_large",
                       headers={"Connection": "close"} if close else None)


# A body declared up to this many times the cap is read to its end (and dropped) before the 413, within
# LINGER_SECONDS: closing on a client still sending makes its kernel drop the answer on the reset (seen: httpx got
# a ReadError for a body 1 byte over the cap). A larger body gets the 413 at once and the connection is closed.
LINGER_FACTOR = 2
LINGER_SECONDS = 5.0


async def _drain(receive: Receive) -> bool:
    """Read the rest of the request body and drop it; False when it did not end within ``LINGER_SECONDS``."""
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return message["type"] == "http.request"
    except TimeoutError:
        return False


async def refused_as_declared(declared: str, limit: int, receive: Receive, cap: int) -> HttpProblem | None:
    """The 413 for a body whose declared length is over ``limit`` (None when it is not), before any of it is used:
    drained first when at most ``LINGER_FACTOR`` x ``limit``, else with the connection closed. ``cap``: the limit
    the answer states."""
    if not (declared.isdigit() and int(declared) > limit):
        return None
    drained = int(declared) <= LINGER_FACTOR * limit and await _drain(receive)
    return too_large(cap, close=not drained)


ProblemRenderer = Callable[[Request, HttpProblem], Response]


class ProblemRoute(APIRoute):
    """A protocol's HTTP route: its errors are written by ``render_problem`` (set by ``routes_rendering``), and its
    body is cut off at the upload cap as it arrives, whoever reads it (FastAPI's form parser included)."""

    render_problem: ProblemRenderer | None = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = scope["app"].state.service.settings.max_upload_bytes + MULTIPART_OVERHEAD
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        received = 0

        async def capped() -> Message:
            nonlocal received
            refusal = await refused_as_declared(declared, limit, receive, limit - MULTIPART_OVERHEAD)
            if refusal is not None:
                raise refusal
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large(limit - MULTIPART_OVERHEAD)
            return message

        await super().handle(scope, capped, send)


def routes_rendering(render: ProblemRenderer) -> type[ProblemRoute]:
    """The route class of a protocol's router, whose errors ``render`` writes:
    ``APIRouter(route_class=routes_rendering(render_error))``."""
    return type(f"{render.__name__}_route", (ProblemRoute,), {"render_problem": staticmethod(render)})


def problem_response(request: Request, problem: HttpProblem) -> Response | None:
    """``problem`` in the error body of the protocol whose route raised it; None outside the protocols' routes."""
    render = getattr(request.scope.get("route"), "render_problem", None)
    return render(request, problem) if render is not None else None


# ------------------------------------------------------------------------------------------------ the upload
@dataclass(frozen=True)
class Upload:
    """An uploaded file, decoded: 24 kHz mono float32 ``pcm``, and what the answers report of the bytes."""

    pcm: np.ndarray
    sha256: str | None  # of a request body (Deepgram's metadata reports it); None for a form's file

    @property
    def duration(self) -> float:
        return len(self.pcm) / SAMPLE_RATE


RawDecoder = Callable[[bytes], np.ndarray]  # raw samples (no container) to 24 kHz mono float32


def authorized(request: Request) -> None:
    """Dependency: refuse with 401 unless the request carries a configured API key (or none is configured)."""
    if not is_authorized(request):
        raise unauthorized()


def _suffix(filename: str | None) -> str:
    """A file name's extension, a hint for the decoders; nothing unless it looks like one."""
    suffix = Path(filename or "").suffix
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix) else ""


def _decode(spool: IO[bytes], size: int, suffix: str, raw: RawDecoder | None, max_seconds: float) -> np.ndarray:
    """The spooled bytes as audio, in a worker thread: raw samples through ``raw``, else any container FFmpeg
    reads (from a named copy on disk: the decoders open a path)."""
    spool.seek(0)
    if raw is not None:
        pcm = raw(spool.read())
        if len(pcm) > max_seconds * SAMPLE_RATE:
            raise AudioTooLong(f"audio longer than the {max_seconds:g} s limit ({len(pcm) / SAMPLE_RATE:.0f} s)")
        return pcm
    if size == 0:
        raise AudioFormatError("empty audio file")
    with tempfile.NamedTemporaryFile(suffix=suffix) as file:
        while block := spool.read(COPY_BLOCK):
            file.write(block)
        file.flush()
        return load_audio_file(file.name, max_seconds, label="the file")


_DECODE_FAILED = re.compile(r"could not decode (.+?) as audio \(")
_TEMP_PATH = re.compile(r"""["']?""" + re.escape(tempfile.gettempdir().rstrip("/")) + r"""/[^\s"':;,)]+["']?""")


def upload_error_detail(exc: Exception) -> str:
    """An undecodable upload's reason for the client: no server paths (the upload sits in a temp file) and no
    decoder library's wording; the decoders' own messages go to the server log."""
    text = str(exc)
    failed = _DECODE_FAILED.match(text)
    if failed:
        log.info("upload not decoded: %s", text)
        return (f"could not decode {failed.group(1)} as audio: not a format we read (wav, flac, mp3, ogg/opus, ...) "
                "or damaged")
    return _TEMP_PATH.sub("the file", text)


async def _decoded(request: Request, spool: IO[bytes], size: int, digest: str | None, suffix: str = "",
                   raw: RawDecoder | None = None) -> Upload:
    settings = get_service(request).settings
    try:
        pcm = await run_in_threadpool(_decode, spool, size, suffix, raw, settings.max_session_s)
    except AudioTooLong as exc:
        raise HttpProblem(413, str(exc), "too_large") from None
    except AudioFormatError as exc:
        raise HttpProblem(400, upload_error_detail(exc), "bad_audio") from None
    return Upload(pcm, digest)


async def read_body(request: Request, raw: RawDecoder | None = None) -> Upload:
    """The request body as an audio file: capped, spooled in chunks, decoded off the event loop."""
    limit = get_service(request).settings.max_upload_bytes
    # the route let a body declared a little over (its form overhead) by
    refusal = await refused_as_declared(request.headers.get("content-length", ""), limit, request.receive, limit)
    if refusal is not None:
        raise refusal
    digest, size = hashlib.sha256(), 0
    with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as spool:
        file = UploadFile(spool)  # its write() moves to a thread once the spool is on disk
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            digest.update(chunk)
            await file.write(chunk)
        return await _decoded(request, spool, size, digest.hexdigest(), raw=raw)


async def uploaded_body(request: Request) -> Upload:
    """Dependency: the request body is the audio file (any container FFmpeg reads)."""
    return await read_body(request)


async def read_form_file(request: Request, file: UploadFile) -> Upload:
    """A multipart form's file field as audio (FastAPI has already spooled it; the route capped the body)."""
    limit = get_service(request).settings.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise too_large(limit)
    return await _decoded(request, file.file, file.size or 0, None, _suffix(file.filename))


# ------------------------------------------------------------------------------------------------ the session
def upload_events(request: Request, upload: Upload, *, diarize: bool = False, decoding: DecodingOptions | None = None):
    """The events of a session over the upload (async iterator; ``diarize``: words with speakers). Its first step
    waits up to ``http_slot_wait_s`` for a slot and raises ``NoFreeSlot`` when none comes (the app answers 503).
    ``decoding``: sampling and keyterms (default: the server's, ``service.decoding_options``)."""
    service = get_service(request)
    return session_events(service.running_engine, upload.pcm, wait_seconds=service.settings.http_slot_wait_s,
                          end_of_turn_threshold=service.settings.end_of_turn_threshold,
                          diarizer=service.running_diarizer if diarize else None,
                          decoding=decoding or service.decoding_options())


async def transcribe(request: Request, upload: Upload, *, diarize: bool = False,
                     decoding: DecodingOptions | None = None) -> list[Word | WordEnd]:
    """The words of the upload and their ends, in order (``diarize``: words carry ``speaker``); an engine failure
    is a 500."""
    words: list[Word | WordEnd] = []
    async for event in upload_events(request, upload, diarize=diarize, decoding=decoding):
        if isinstance(event, Error):
            raise HttpProblem(500, event.message, "failed")
        if isinstance(event, (Word, WordEnd)):
            words.append(event)
    return words
