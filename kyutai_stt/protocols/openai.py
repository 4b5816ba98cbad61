"""OpenAI-compatible file transcription: ``POST /v1/audio/transcriptions`` and ``GET /v1/models``.

Spoken by the ``openai`` SDK and the many tools built on it. Files are transcribed at full speed through the same
engine as live streams (several requests share the batch). ``response_format``: json, text, srt, vtt,
verbose_json (segments; words when ``timestamp_granularities[]=word``); ``stream=true`` answers server-sent events
``transcript.text.delta`` / ``transcript.text.done``. Auth: ``Authorization: Bearer KEY`` when keys are configured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..audio import AudioFormatError, AudioTooLong, load_audio_bytes
from ..auth import is_authorized
from ..checkpoint import SAMPLE_RATE
from ..engine import NoFreeSlot
from ..events import Error, Text, Word, WordEnd
from ..service import get_service
from .errors import upload_error_detail
from ..formats import cues, to_srt, to_text, to_vtt
from ..transcribe import session_events
from ..words import pair_words

router = APIRouter(prefix="/v1")

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status, headers=headers)


def _model_id(request: Request) -> str:
    model = get_service(request).settings.model
    return Path(model).name if Path(model).exists() else model


@router.get("/models")
async def list_models(request: Request):
    if not is_authorized(request):
        return _error(401, "missing or invalid API key", "authentication_error")
    return {"object": "list", "data": [{"id": _model_id(request), "object": "model", "created": 0, "owned_by": "kyutai"}]}


@router.post("/audio/transcriptions")
async def transcriptions(
    request: Request,
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form()] = "",
    response_format: Annotated[str, Form()] = "json",
    language: Annotated[str | None, Form()] = None,
    prompt: Annotated[str | None, Form()] = None,
    temperature: Annotated[float, Form()] = 0.0,
    stream: Annotated[bool, Form()] = False,
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
):
    if not is_authorized(request):
        return _error(401, "missing or invalid API key", "authentication_error")
    if response_format not in FORMATS:
        return _error(400, f"response_format must be one of {', '.join(FORMATS)}")
    service = get_service(request)
    settings = service.settings
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        return _error(413, f"file larger than {settings.max_upload_bytes} bytes")
    try:
        # decoding takes a while for a long file: off the event loop, so that live streams are not held up
        pcm = await run_in_threadpool(load_audio_bytes, data, suffix=Path(file.filename or "").suffix,
                                      max_seconds=settings.max_session_s)
    except AudioTooLong as exc:
        return _error(413, str(exc))
    except AudioFormatError as exc:
        return _error(400, upload_error_detail(exc))
    duration = len(pcm) / SAMPLE_RATE
    events = session_events(service.running_engine, pcm, wait_seconds=settings.http_slot_wait_s,
                            end_of_turn_threshold=settings.end_of_turn_threshold)

    if stream:
        try:
            first = await anext(events)  # take the slot now, so a full server answers 503 rather than a broken stream
        except NoFreeSlot:
            return _error(503, "all streams are busy, retry later", "server_error", {"Retry-After": "5"})

        async def sse():
            pieces = []
            async for event in _prepend(first, events):
                if isinstance(event, Text):
                    delta = event.text if pieces else event.text.lstrip()
                    pieces.append(delta)
                    yield f"data: {json.dumps({'type': 'transcript.text.delta', 'delta': delta})}\n\n"
                elif isinstance(event, Error):
                    yield f"data: {json.dumps({'type': 'error', 'error': {'message': event.message}})}\n\n"
                    return
            yield f"data: {json.dumps({'type': 'transcript.text.done', 'text': ''.join(pieces)})}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    collected = []
    try:
        async for event in events:
            if isinstance(event, Error):
                return _error(500, event.message, "server_error")
            if isinstance(event, (Word, WordEnd)):
                collected.append(event)
    except NoFreeSlot:
        return _error(503, "all streams are busy, retry later", "server_error", {"Retry-After": "5"})
    words = pair_words(collected)
    text = to_text(words)
    if response_format == "json":
        return {"text": text}
    if response_format == "text":
        return PlainTextResponse(text)
    if response_format == "srt":
        return PlainTextResponse(to_srt(words, duration))
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(words, duration), media_type="text/vtt")
    body = {
        "task": "transcribe",
        "language": language or "english",
        "duration": round(duration, 3),
        "text": text,
        "segments": [
            {"id": i, "seek": 0, "start": group[0].start, "end": max(group[-1].end, group[0].start),
             "text": " " + " ".join(w.text for w in group), "tokens": [], "temperature": 0.0, "avg_logprob": 0.0,
             "compression_ratio": 1.0, "no_speech_prob": 0.0}
            for i, group in enumerate(cues(words))
        ],
    }
    if timestamp_granularities and "word" in timestamp_granularities:
        body["words"] = [{"word": w.text, "start": w.start, "end": w.end} for w in words]
    return body


async def _prepend(first, rest):
    yield first
    async for item in rest:
        yield item
