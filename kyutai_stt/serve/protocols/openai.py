"""OpenAI-compatible file transcription: ``POST /v1/audio/transcriptions`` and ``GET /v1/models``.

Spoken by the ``openai`` SDK and the many tools built on it. Files are transcribed at full speed through the same
engine as live streams (several requests share the batch). ``response_format``: json, text, srt, vtt,
verbose_json (segments; words when ``timestamp_granularities[]=word``), diarized_json (OpenAI's
``gpt-4o-transcribe-diarize`` answer: segments of one speaker each, speakers "A", "B"...; a server with a diarizer;
``model=gpt-4o-transcribe-diarize`` also labels srt/vtt cues with their speaker); ``stream=true`` answers server-sent events
``transcript.text.delta`` / ``transcript.text.done``. Auth: ``Authorization: Bearer KEY`` when keys are configured.

Optional parameters (``_check_parameters``): ``language`` is checked against the served model's languages
(``kyutai_stt.languages``) and reported in ``verbose_json`` as OpenAI does ("english", "french");
``temperature`` 0 (greedy) to 2 (sampling; the server's ``default_temperature`` when not given); ``prompt`` is
read as a list of keyterms to favour (comma- or newline-separated terms, not a free-text prompt: the model takes no
text context); ``chunking_strategy`` ``auto`` only; ``include[]`` (log probabilities) is refused. Every refusal is a 400 in OpenAI's shape (``{"error": {"message", "type",
"param", "code"}}``); ``/v1/audio/translations`` answers 400 (the models do not translate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from kyutai_stt.engine.contract import DecodingOptions, split_keyterms
from kyutai_stt.messages.languages import NAMES, base_language
from kyutai_stt.messages.events import Error, Text, Word
from kyutai_stt.messages.openai import (ErrorBody, ErrorDetail, Model, ModelList, Transcription,
                                       TranscriptionDiarized, TranscriptionDiarizedSegment, TranscriptionSegment,
    TranscriptionVerbose, TranscriptionWord)

from kyutai_stt.serve.service import get_service
from kyutai_stt.serve.uploads import (HttpProblem, authorized, read_form_file, routes_rendering, transcribe,
    upload_events)
from kyutai_stt.stream.formats import cues, to_srt, to_text, to_vtt
from kyutai_stt.stream.words import pair_words

FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
DIARIZE_MODEL = "gpt-4o-transcribe-diarize"  # OpenAI's diarizing model: its name asks for speakers here too


def render_error(request: Request, problem: HttpProblem) -> JSONResponse:
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    status = problem.status_code
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    param, code = ("file", "invalid_audio") if problem.reason == "bad_audio" else (problem.param, problem.code)
    body = ErrorBody(error=ErrorDetail(message=problem.message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=problem.headers)


router = APIRouter(prefix="/v1", route_class=routes_rendering(render_error))


def _refuse(message: str, param: str | None = None, code: str | None = None) -> HttpProblem:
    return HttpProblem(400, message, param=param, code=code)


def _check_parameters(supported: tuple[str, ...], language: str | None, prompt: str | None, temperature: str | None,
                      include: list[str] | None, chunking_strategy: str | None,
                      service=None) -> DecodingOptions | None:
    """OpenAI's optional parameters: honoured (``language``, ``temperature``, ``prompt`` as keyterms,
    ``chunking_strategy=auto``) or refused with a 400 that says why. Returns the stream's decoding."""
    if language:
        if base_language(language) not in supported or len(language) > 35:
            raise _refuse(f"language {language!r} is not supported by the served model, which transcribes "
                          f"{', '.join(supported)} (ISO 639-1)", param="language", code="unsupported_language")
    value = None
    if temperature not in (None, ""):
        try:
            value = float(temperature)
        except ValueError:
            raise _refuse("temperature must be a number", param="temperature") from None
    decoding = None
    if service is not None:
        try:
            decoding = service.decoding_options(value, None, split_keyterms(prompt or ""))
        except ValueError as exc:
            raise _refuse(str(exc), param="temperature" if "temperature" in str(exc) else "prompt") from None
    if include:
        raise _refuse(f"include {include} is not supported: the engine does not report token log "
                      "probabilities", param="include", code="unsupported_parameter")
    if chunking_strategy not in (None, "", "auto"):
        raise _refuse("only chunking_strategy=auto is supported: the whole file is one stream, transcribed "
                      "with the model's own timing (no server-side VAD chunking)", param="chunking_strategy",
                      code="unsupported_parameter")
    return decoding


def _language_name(supported: tuple[str, ...], language: str | None) -> str:
    """verbose_json's ``language``, as OpenAI writes it ("english", "french"): the one asked for, else the model's
    only language; a multilingual model without a ``language`` says "unknown" (it detects none)."""
    if language:
        code = base_language(language)
        return NAMES.get(code, code)
    return NAMES.get(supported[0], supported[0]) if len(supported) == 1 else "unknown"


def _model_id(request: Request) -> str:
    model = get_service(request).settings.model
    return Path(model).name if Path(model).exists() else model


@router.get("/models", dependencies=[Depends(authorized)])
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[Model(id=_model_id(request))])


@router.post("/audio/transcriptions", dependencies=[Depends(authorized)],
             response_model=TranscriptionVerbose | TranscriptionDiarized | Transcription,
             response_model_exclude_none=True)
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
    if file is None or isinstance(file, str):
        raise _refuse("file is required (multipart form field 'file')", param="file")
    if response_format not in FORMATS:
        raise _refuse(f"response_format must be one of {', '.join(FORMATS)}", param="response_format")
    if stream.lower() not in ("true", "false"):
        raise _refuse("stream must be true or false", param="stream")
    if any(key.startswith("chunking_strategy[") for key in await request.form()):
        chunking_strategy = "server_vad"  # the SDK sends an object as chunking_strategy[type]=...: not "auto"
    supported = get_service(request).running_engine.info.languages
    decoding = _check_parameters(supported, language, prompt, temperature, include, chunking_strategy,
                                 get_service(request))
    diarize = response_format == "diarized_json" or model == DIARIZE_MODEL
    if diarize and get_service(request).diarizer is None:
        raise _refuse(f"speakers (response_format=diarized_json, model={DIARIZE_MODEL}) need a server started with "
                      "a diarizer (--diarizer)", param="response_format")
    if diarize and stream.lower() == "true":
        raise _refuse("speakers are not streamed: use stream=false", param="stream")
    upload = await read_form_file(request, file)

    if stream.lower() == "true":
        events = upload_events(request, upload, decoding=decoding)
        first = await anext(events)  # take the slot now, so a full server answers 503 rather than a broken stream

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

    events = await transcribe(request, upload, diarize=diarize, decoding=decoding)
    words = pair_words(events)
    speakers = [e.speaker for e in events if isinstance(e, Word)] if diarize else None  # one per paired word
    text = to_text(words)
    if response_format == "json":
        return Transcription(text=text)
    if response_format == "text":
        return PlainTextResponse(text)
    if response_format == "srt":
        return PlainTextResponse(to_srt(words, upload.duration, speakers))
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(words, upload.duration, speakers), media_type="text/vtt")
    if response_format == "diarized_json":
        who = {id(w): s for w, s in zip(words, speakers)}
        return TranscriptionDiarized(duration=round(upload.duration, 3), text=text, segments=[
            TranscriptionDiarizedSegment(id=f"seg_{i}", start=group[0].start, end=max(group[-1].end, group[0].start),
                                         text=" ".join(w.text for w in group),
                                         speaker=_letter(who[id(group[0])]))
            for i, group in enumerate(cues(words, speakers))])
    segments = [TranscriptionSegment(id=i, start=group[0].start, end=max(group[-1].end, group[0].start),
                                     text=" " + " ".join(w.text for w in group))
                for i, group in enumerate(cues(words))]
    with_words = timestamp_granularities and "word" in timestamp_granularities
    return TranscriptionVerbose(
        language=_language_name(supported, language), duration=round(upload.duration, 3), text=text,
        segments=segments,
        words=[TranscriptionWord(word=w.text, start=w.start, end=w.end) for w in words] if with_words else None)


@router.post("/audio/translations")
async def translations(request: Request):
    """Not offered: the models transcribe; they do not translate."""
    raise _refuse("translation is not supported: this server transcribes speech in its own language "
                  "(use /v1/audio/transcriptions)", code="unsupported_endpoint")


def _letter(speaker: int | None) -> str:
    """OpenAI's speaker labels: A, B, ... (Z, then AA...)."""
    n, label = (speaker or 0), ""
    while True:
        n, rest = divmod(n, 26)
        label = chr(ord("A") + rest) + label
        if not n:
            return label
        n -= 1


async def _prepend(first, rest):
    yield first
    async for item in rest:
        yield item
