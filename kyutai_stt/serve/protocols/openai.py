"""OpenAI-compatible file transcription: ``POST /v1/audio/transcriptions`` and ``GET /v1/models``.

Spoken by the ``openai`` SDK and the many tools built on it. Files are transcribed at full speed through the same
engine as live streams (several requests share the batch). ``response_format``: json, text, srt, vtt,
verbose_json (segments; words when ``timestamp_granularities[]=word``); ``stream=true`` answers server-sent events
``transcript.text.delta`` / ``transcript.text.done``. Auth: ``Authorization: Bearer KEY`` when keys are configured.

Optional parameters (``_check_parameters``): ``language`` is checked against the served model's languages
(``kyutai_stt.languages``) and reported in ``verbose_json`` as OpenAI does ("english", "french");
``temperature`` 0 only (greedy decoding); ``chunking_strategy`` ``auto`` only; ``prompt`` and ``include[]``
(log probabilities) are refused. Every refusal is a 400 in OpenAI's shape (``{"error": {"message", "type",
"param", "code"}}``); ``/v1/audio/translations`` answers 400 (the models do not translate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kyutai_stt.audio.decode import AudioFormatError, AudioTooLong, load_audio_bytes
from kyutai_stt.serve.auth import is_authorized
from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.engine.contract import ModelInfo, NoFreeSlot
from kyutai_stt.messages.events import Error, Text, Word, WordEnd
from kyutai_stt.serve.service import get_service
from kyutai_stt.serve.protocols.errors import upload_error_detail
from kyutai_stt.stream.formats import cues, to_srt, to_text, to_vtt
from kyutai_stt.messages.languages import NAMES, base_language
from kyutai_stt.stream.transcribe import session_events
from kyutai_stt.stream.words import pair_words

router = APIRouter(prefix="/v1")

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None,
           param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _check_parameters(model: ModelInfo, language: str | None, prompt: str | None, temperature: str | None,
                      include: list[str] | None, chunking_strategy: str | None) -> JSONResponse | None:
    """OpenAI's optional parameters: honoured (``language``, ``temperature=0``, ``chunking_strategy=auto``) or
    refused with a 400 that says why. None when all is well."""
    if language:
        supported = model.languages
        if base_language(language) not in supported or len(language) > 35:
            return _error(400, f"language {language!r} is not supported by the served model, which transcribes "
                          f"{', '.join(supported)} (ISO 639-1)", param="language", code="unsupported_language")
    if prompt:
        return _error(400, "prompt is not supported: the model takes no text prompt", param="prompt",
                      code="unsupported_parameter")
    if temperature not in (None, ""):
        try:
            value = float(temperature)
        except ValueError:
            return _error(400, "temperature must be a number", param="temperature")
        if value != 0:
            return _error(400, "only temperature 0 is supported: decoding is greedy (argmax)", param="temperature",
                          code="unsupported_parameter")
    if include:
        return _error(400, f"include {include} is not supported: the engine does not report token log "
                      "probabilities", param="include", code="unsupported_parameter")
    if chunking_strategy not in (None, "", "auto"):
        return _error(400, "only chunking_strategy=auto is supported: the whole file is one stream, transcribed "
                      "with the model's own timing (no server-side VAD chunking)", param="chunking_strategy",
                      code="unsupported_parameter")
    return None


def _language_name(model: ModelInfo, language: str | None) -> str:
    """verbose_json's ``language``, as OpenAI writes it ("english", "french"): the one asked for, else the model's
    only language; a multilingual model without a ``language`` says "unknown" (it detects none)."""
    if language:
        code = base_language(language)
        return NAMES.get(code, code)
    supported = model.languages
    return NAMES.get(supported[0], supported[0]) if len(supported) == 1 else "unknown"


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
    # every field is optional and a string here, checked below: a bad value gets OpenAI's 400, not FastAPI's 422
    file: Annotated[UploadFile | None, File()] = None,
    model: Annotated[str, Form()] = "",
    response_format: Annotated[str, Form()] = "json",
    language: Annotated[str | None, Form()] = None,
    prompt: Annotated[str | None, Form()] = None,
    temperature: Annotated[str | None, Form()] = None,
    stream: Annotated[str, Form()] = "false",
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
    include: Annotated[list[str] | None, Form(alias="include[]")] = None,
    chunking_strategy: Annotated[str | None, Form()] = None,
):
    if not is_authorized(request):
        return _error(401, "missing or invalid API key", "authentication_error")
    if file is None or isinstance(file, str):
        return _error(400, "file is required (multipart form field 'file')", param="file")
    if response_format not in FORMATS:
        return _error(400, f"response_format must be one of {', '.join(FORMATS)}", param="response_format")
    if stream.lower() not in ("true", "false"):
        return _error(400, "stream must be true or false", param="stream")
    stream_on = stream.lower() == "true"
    if any(key.startswith("chunking_strategy[") for key in await request.form()):
        chunking_strategy = "server_vad"  # the SDK sends an object as chunking_strategy[type]=...: not "auto"
    service = get_service(request)
    if bad := _check_parameters(service.running_engine.info, language, prompt, temperature, include,
                                chunking_strategy):
        return bad
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
        return _error(400, upload_error_detail(exc), param="file", code="invalid_audio")
    duration = len(pcm) / SAMPLE_RATE
    events = session_events(service.running_engine, pcm, wait_seconds=settings.http_slot_wait_s,
                            end_of_turn_threshold=settings.end_of_turn_threshold)

    if stream_on:
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
        "language": _language_name(service.running_engine.info, language),
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


@router.post("/audio/translations")
async def translations(request: Request):
    """Not offered: the models transcribe; they do not translate."""
    return _error(400, "translation is not supported: this server transcribes speech in its own language "
                  "(use /v1/audio/transcriptions)", code="unsupported_endpoint")


async def _prepend(first, rest):
    yield first
    async for item in rest:
        yield item
