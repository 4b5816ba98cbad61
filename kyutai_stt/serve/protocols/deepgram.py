"""Deepgram-compatible speech to text: streaming ``WS /v1/listen`` and pre-recorded ``POST /v1/listen``.

Spoken by deepgram-sdk (``client.listen.v1.connect``), LiveKit's Deepgram STT plugin and Pipecat's
DeepgramSTTService, each pointed here by its base-URL option. Message shapes follow Deepgram's public API reference
(developers.deepgram.com/reference/speech-to-text/listen-streaming) and the typed models of deepgram-sdk 7.

Mapping onto our session events:
- ``Results`` with ``is_final: false`` (``interim_results=true``): the words not final yet, i.e. the last complete
  word whose end is still unknown plus the pieces of the word being recognised (``Text`` events).
- ``Results`` with ``is_final: true``: one per final word, sent once its end is known (``Word`` + ``WordEnd``),
  so final words come in order with the same text and times as every other protocol.
- ``speech_final: true`` on the first final result after the VAD head's end of turn (``EndOfTurn``), unless
  ``endpointing=false``. ``UtteranceEnd`` (when ``utterance_end_ms`` is given) at that end of turn, with
  ``last_word_end`` the time the VAD decided. ``SpeechStarted`` (``vad_events=true``) with the first text of a turn.
- ``Finalize``: the stream is flushed without ending (``flush.flush_now``); once that is transcribed, every word
  complete by then is sent as final (the last one ending where the audio ended) with ``from_finalize: true``; a
  word whose pieces are still coming at the end of the flush stays open (it continues with the next audio). The stream stays open; the silence is not counted in later timestamps.
- ``CloseStream`` (or an empty binary message): flush, the last words, ``Metadata``, close 1000. ``KeepAlive``
  resets the idle timer.
- ``confidence`` is 1.0: decoding is greedy and the engine does not report token probabilities.

Errors: a bad query parameter is refused at the handshake with HTTP 400 and Deepgram's REST error body
(``{"err_code", "err_msg", "request_id"}``); bad data in the stream gets an ``Error`` message
(``{"type": "Error", "variant", "description", "message"}``) then close 1008 (``DATA-0000``, as Deepgram does).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import uuid
from datetime import datetime, timezone
from typing import Callable

import numpy as np
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from kyutai_stt.audio.decode import AudioFormatError, AudioTooLong, OggOpusDecoder, StreamResampler, load_audio_bytes
from kyutai_stt.serve.auth import is_authorized
from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.audio.codecs import ContainerStreamDecoder
from kyutai_stt.engine.contract import NoFreeSlot
from kyutai_stt.messages.events import EndOfTurn, Error, Marker, Text, Word, WordEnd
from kyutai_stt.messages.languages import base_language
from kyutai_stt.messages.deepgram import (Alternative, CloseStream, Control, Finalize, Metadata, ModelInfo,
    ResultChannel, ResultMetadata, Results, ResultWord, SpeechStarted, StreamError, UtteranceEnd)
from kyutai_stt.serve.service import get_service
from kyutai_stt.stream.session import Session, SessionLimitError
from kyutai_stt.stream.transcribe import session_events
from kyutai_stt.stream.words import pair_words
from kyutai_stt.serve.protocols.common import (INTERNAL_ERROR, POLICY_VIOLATION, CloseSocket, close, open_session,
    receive_message, serve_session)
from kyutai_stt.serve.protocols.errors import upload_error_detail
from kyutai_stt.stream.flush import Timeline, flush_now

router = APIRouter()

FLAGS = {"true": True, "false": False}
RAW = ("linear16", "mulaw", "alaw")
ENCODINGS = RAW + ("opus", "ogg-opus")
# Accepted only with the value that matches what we do (the others are refused: we cannot honour them).
FIXED = {"smart_format": "false", "numerals": "false", "profanity_filter": "false", "diarize": "false",
         "dictation": "false", "multichannel": "false", "detect_entities": "false", "filler_words": "true",
         "detect_language": "false", "version": "latest"}
WHY_FIXED = {"filler_words": "the model writes what it hears, filler words included",
             "version": "only the served model's latest version exists"}
# Accepted with any value, and why each changes nothing here.
LABELS = {"model": "the served model answers whatever the name (Metadata.model_info says which)",
          "no_delay": "only matters with smart_format", "mip_opt_out": "nothing is sent anywhere",
          "tag": "no usage reporting", "auth_id": "our API key", "api_key": "our API key"}
UNSUPPORTED = ("keyterm", "keywords", "search", "replace", "redact", "callback", "callback_method", "extra",
               "diarize_model", "language_hint", "topics", "intents", "sentiment", "summarize", "paragraphs",
               "utterances", "utt_split", "alternatives", "measurements", "ner")


class DeepgramError(ValueError):
    """A request Deepgram would refuse: ``err_code`` and a message."""

    def __init__(self, message: str, err_code: str = "INVALID_QUERY_PARAMETER"):
        super().__init__(message)
        self.err_code = err_code


class ListenOptions(BaseModel):
    """The query parameters of ``/v1/listen``, checked (see ``parse_options``)."""

    encoding: str | None = None
    sample_rate: int | None = None
    interim_results: bool = False
    punctuate: bool = False
    endpointing: bool = True  # speech_final on end of turn (Deepgram's default is on)
    utterance_end: bool = False
    vad_events: bool = False
    language: str = "en"


def _flag(name: str, value: str) -> bool:
    if value.lower() not in FLAGS:
        raise DeepgramError(f"{name} must be true or false, not {value!r}")
    return FLAGS[value.lower()]


def parse_options(params: list[tuple[str, str]], languages: tuple[str, ...], streaming: bool) -> ListenOptions:
    """Check every query parameter: honoured, accepted as a label (``LABELS``), or refused (``DeepgramError``)."""
    options = ListenOptions()
    seen: set[str] = set()
    for name, value in params:
        if name in seen and name != "tag":
            raise DeepgramError(f"{name} given twice")
        seen.add(name)
        if name == "encoding":
            if value not in ENCODINGS:
                raise DeepgramError(f"encoding {value!r} is not supported here: use one of {', '.join(ENCODINGS)}, "
                                    "or none for container audio (WebM/Opus, Ogg, mp3, ...)")
            options.encoding = value
        elif name == "sample_rate":
            if not re.fullmatch(r"[0-9]{4,6}", value) or not 8000 <= int(value) <= 192000:
                raise DeepgramError("sample_rate must be an integer from 8000 to 192000")
            options.sample_rate = int(value)
        elif name == "channels":
            if value != "1":
                raise DeepgramError("only mono audio is supported: channels must be 1")
        elif name in ("interim_results", "punctuate", "vad_events"):
            setattr(options, name, _flag(name, value))
        elif name == "endpointing":
            if value.lower() == "false":
                options.endpointing = False
            elif not re.fullmatch(r"[0-9]{1,6}", value) and value.lower() != "true":
                raise DeepgramError("endpointing must be false or a number of milliseconds")
            # a number: end of speech comes from the model's VAD head, not from a silence length
        elif name == "utterance_end_ms":
            if not re.fullmatch(r"[0-9]{1,6}", value) or int(value) < 1000:
                raise DeepgramError("utterance_end_ms must be an integer of at least 1000")
            options.utterance_end = True
        elif name == "language":
            if base_language(value) not in languages:
                raise DeepgramError(f"language {value!r} is not supported by the served model, which transcribes "
                                    f"{', '.join(languages)}")
            options.language = base_language(value)
        elif name in FIXED:
            if value.lower() != FIXED[name]:
                why = WHY_FIXED.get(name, "not supported by this server")
                raise DeepgramError(f"{name}={value} is not supported ({why}): use {name}={FIXED[name]} or leave it out")
        elif name in LABELS:
            continue
        elif name in UNSUPPORTED:
            raise DeepgramError(f"{name} is not supported by this server")
        else:
            raise DeepgramError(f"unknown parameter {name!r}")
    if options.encoding in RAW and options.sample_rate is None:
        raise DeepgramError(f"sample_rate is required with encoding={options.encoding}")
    if options.encoding not in RAW and options.sample_rate is not None and streaming:
        raise DeepgramError("sample_rate is only for raw encodings (linear16, mulaw, alaw)")
    return options


def _rest_error(status: int, message: str, err_code: str, request_id: str) -> JSONResponse:
    return JSONResponse({"err_code": err_code, "err_msg": message, "request_id": request_id}, status_code=status)


def _plain(text: str) -> str:
    """Deepgram's ``word``: lower case, without punctuation (``punctuated_word`` keeps the model's spelling)."""
    return re.sub(r"[^\w'-]+", "", text.lower()) or text.lower()


def _result_word(text: str, start: float, end: float) -> ResultWord:
    return ResultWord(word=_plain(text), start=round(start, 4), end=round(end, 4), punctuated_word=text)


def _transcript(words: list[ResultWord], punctuate: bool) -> str:
    return " ".join(w.punctuated_word if punctuate else w.word for w in words)


# ----------------------------------------------------------------------------- audio input
class _RawDecoder:
    """linear16 (little-endian int16), mu-law or A-law at ``rate`` to 24 kHz float; samples may be split."""

    def __init__(self, encoding: str, rate: int):
        self.encoding = encoding
        self.width = 2 if encoding == "linear16" else 1
        self.rate = rate
        self.resampler = StreamResampler(rate)
        self._carry = b""
        if encoding != "linear16":
            from kyutai_stt.audio.codecs import g711_decode  # noqa: F401  (checked at the handshake: see _decoder)

    def feed(self, data: bytes) -> np.ndarray:
        data = self._carry + data
        usable = len(data) - len(data) % self.width
        self._carry = data[usable:]
        if self.encoding == "linear16":
            pcm = np.frombuffer(data[:usable], "<i2").astype(np.float32) / 32768
        else:
            from kyutai_stt.audio.codecs import g711_decode

            pcm = g711_decode(data[:usable], "mulaw" if self.encoding == "mulaw" else "alaw")
        return self.resampler.feed(pcm)

    def flush(self) -> np.ndarray:
        """The audio the resampler still holds; a new resampler starts after it (``Finalize`` keeps going)."""
        out = self.resampler.flush()
        self.resampler = StreamResampler(self.rate)
        return out

    end = flush

    def close(self) -> None:
        pass


class _OggDecoder(OggOpusDecoder):
    def flush(self) -> np.ndarray:
        return np.zeros(0, np.float32)  # Ogg pages decode whole: nothing is held back

    def end(self) -> np.ndarray:
        return np.zeros(0, np.float32)

    def close(self) -> None:
        pass


class _ContainerDecoder(ContainerStreamDecoder):
    """Container audio (WebM/Opus, Ogg, mp3, ...; FFmpeg probes it). ``Finalize`` cannot flush it mid-stream: the
    audio decoded so far is flushed (the decoder's resampler holds back under 0.1 s until the end)."""

    def flush(self) -> np.ndarray:
        return np.zeros(0, np.float32)

    def end(self) -> np.ndarray:
        return self.finish()


def _decoder(options: ListenOptions):
    if options.encoding in RAW:
        if options.encoding != "linear16":
            try:
                from kyutai_stt.audio.codecs import g711_decode  # noqa: F401
            except ImportError:
                raise DeepgramError(f"encoding={options.encoding} is not available on this server yet") from None
        return _RawDecoder(options.encoding, options.sample_rate)
    if options.encoding is None:
        return _ContainerDecoder(None)
    return _OggDecoder()


# ----------------------------------------------------------------------------- streaming
class _Transcript:
    """Turns session events into Deepgram messages for one stream (see the module docstring for the rules)."""

    def __init__(self, options: ListenOptions, request_id: str, model_name: str, model_uuid: str):
        self.options = options
        self.metadata = ResultMetadata(request_id=request_id, model_info=ModelInfo(name=model_name),
                                       model_uuid=model_uuid)
        self.pending: Word | None = None  # complete word, end not known yet
        self.pieces: list[Text] = []  # the word being recognised
        self.cursor = 0.0  # end of the last final result
        self.in_turn = False
        self.speech_final_due = False
        self.finalize_ids: set[int] = set()
        self.shift: Callable[[float], float] = lambda t: t

    def _results(self, words: list[ResultWord], is_final: bool, end: float, from_finalize: bool = False) -> Results:
        speech_final = False
        if is_final and self.speech_final_due and self.options.endpointing:
            speech_final, self.speech_final_due = True, False
        start = self.cursor if is_final else (words[0].start if words else self.cursor)
        return Results(duration=round(max(0.0, end - start), 4), start=round(start, 4), is_final=is_final,
                       speech_final=speech_final, from_finalize=from_finalize,
                       channel=ResultChannel(alternatives=[Alternative(
                           transcript=_transcript(words, self.options.punctuate), words=words)]),
                       metadata=self.metadata)

    def _final(self, word: Word, end: float, from_finalize: bool = False) -> Results:
        start = self.shift(word.start_time)
        end = max(self.shift(end), start)
        result = _result_word(word.text, start, end)
        message = self._results([result], True, end, from_finalize)
        self.cursor = end
        return message

    def on_event(self, event) -> list[BaseModel]:
        out: list[BaseModel] = []
        if isinstance(event, Text):
            if not self.in_turn:
                self.in_turn = True
                if self.options.vad_events:
                    out.append(SpeechStarted(timestamp=round(self.shift(event.time), 4)))
            self.pieces.append(event)
            out += self._interim()
        elif isinstance(event, Word):
            if self.pending is not None:  # no WordEnd in between: it ends where this one starts
                out.append(self._final(self.pending, event.start_time))
            self.pending, self.pieces = event, []
        elif isinstance(event, WordEnd):
            if self.pending is not None:
                out.append(self._final(self.pending, event.stop_time))
                self.pending = None
        elif isinstance(event, EndOfTurn):
            self.in_turn = False
            self.speech_final_due = True
            if self.options.utterance_end:
                out.append(UtteranceEnd(last_word_end=round(self.shift(event.time), 4)))
        return out

    def _interim(self) -> list[BaseModel]:
        if not self.options.interim_results:
            return []
        words = []
        now = self.shift(self.pieces[-1].time) if self.pieces else self.cursor
        if self.pending is not None:
            words.append(_result_word(self.pending.text, self.shift(self.pending.start_time), now))
        if self.pieces:
            text = "".join(p.text for p in self.pieces).strip()
            if text:
                words.append(_result_word(text, self.shift(self.pieces[0].time), now))
        return [self._results(words, False, now)] if words else []

    def finalized(self, end: float) -> list[BaseModel]:
        """Every word heard before Finalize is out: the pending one ends at the end of the flush."""
        if self.pending is not None:
            message = self._final(self.pending, end, from_finalize=True)
            self.pending = None
            return [message]
        return [self._results([], True, self.cursor, from_finalize=True)]


@router.websocket("/v1/listen")
async def listen_socket(ws: WebSocket) -> None:
    request_id = str(uuid.uuid4())
    engine = get_service(ws).running_engine
    try:
        options = parse_options(list(ws.query_params.multi_items()), engine.info.languages, streaming=True)
        decoder = _decoder(options)
    except DeepgramError as exc:
        if not is_authorized(ws):
            await _deny(ws, _rest_error(401, "Invalid credentials.", "INVALID_AUTH", request_id))
            return
        await _deny(ws, _rest_error(400, str(exc), exc.err_code, request_id))
        return
    session = await open_session(ws, "deepgram")
    if session is None:
        return
    model = engine.info
    model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, model.name))
    transcript = _Transcript(options, request_id, model.name.rstrip("/").split("/")[-1], model_uuid)
    digest = hashlib.sha256()
    created = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    timeline = Timeline()
    finalize_ends: dict[int, float] = {}  # marker id -> client time where the audio before Finalize ended
    markers = itertools.count(1)
    shift = transcript.shift = timeline.client_time

    def finalize() -> None:
        session.push_pcm(decoder.flush())
        marker = next(markers)
        finalize_ends[marker] = flush_now(session, marker, timeline)

    async def receive(session: Session) -> None:
        while True:
            message = await receive_message(ws, session)
            data = message.get("bytes")
            try:
                if data is not None:
                    if not data:  # Deepgram's older close signal
                        session.push_pcm(decoder.end())
                        session.end()
                        return
                    digest.update(data)
                    session.push_pcm(decoder.feed(data))
                    continue
                try:
                    control = Control.validate_json(message.get("text") or "")
                except ValidationError:
                    raise _DataError('unknown message: send audio as binary messages, or a JSON control '
                                     '{"type": "KeepAlive" | "Finalize" | "CloseStream"}') from None
                if isinstance(control, CloseStream):
                    session.push_pcm(decoder.end())
                    session.end()
                    return
                if isinstance(control, Finalize):
                    finalize()
            except AudioFormatError as exc:
                raise _DataError(f"the audio could not be decoded as {options.encoding or 'container audio'}: {exc}") from None
            except SessionLimitError as exc:
                raise _DataError(str(exc)) from None

    async def send(session: Session) -> None:
        async for event in session:
            if isinstance(event, Error):
                await _send_error(ws, "NET-0000", event.message)
                raise CloseSocket(INTERNAL_ERROR, "NET-0000")
            if isinstance(event, Marker) and event.id in finalize_ends:
                end = finalize_ends.pop(event.id)
                for item in transcript.finalized(end):
                    await ws.send_text(item.model_dump_json())
                continue
            for item in transcript.on_event(event):
                await ws.send_text(item.model_dump_json())
        duration = shift(session.samples_received / SAMPLE_RATE)
        await ws.send_text(Metadata(request_id=request_id, sha256=digest.hexdigest(), created=created,
                                    duration=round(duration, 4), models=[model_uuid],
                                    model_info={model_uuid: transcript.metadata.model_info}).model_dump_json())

    async def receive_or_report(session: Session) -> None:
        try:
            await receive(session)
        except _DataError as exc:
            await _send_error(ws, "DATA-0000", str(exc))
            raise CloseSocket(POLICY_VIOLATION, "DATA-0000") from None
        finally:
            decoder.close()  # a container decoder's helper thread

    await serve_session(ws, session, receive_or_report, send)


class _DataError(Exception):
    pass


async def _send_error(ws: WebSocket, variant: str, message: str) -> None:
    try:
        await ws.send_text(StreamError(variant=variant, description=message, message=message).model_dump_json())
    except Exception:  # the client is gone: the close that follows says the rest
        pass


async def _deny(ws: WebSocket, response: JSONResponse) -> None:
    try:
        await ws.send_denial_response(response)
    except RuntimeError:  # a server without the denial extension
        await ws.accept()
        await close(ws, POLICY_VIOLATION, json.loads(response.body)["err_msg"])


# ----------------------------------------------------------------------------- pre-recorded
@router.post("/v1/listen")
async def listen_file(request: Request):
    """Deepgram's pre-recorded API: the audio file is the request body (any format we decode; raw audio with
    ``encoding`` and ``sample_rate``). A JSON body with a ``url`` is refused: this server fetches nothing."""
    request_id = str(uuid.uuid4())
    if not is_authorized(request):
        return _rest_error(401, "Invalid credentials.", "INVALID_AUTH", request_id)
    engine = get_service(request).running_engine
    settings = get_service(request).settings
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("interim_results", "vad_events",
                                                                                "endpointing", "utterance_end_ms")]
    try:
        options = parse_options(params, engine.info.languages, streaming=False)
    except DeepgramError as exc:
        return _rest_error(400, str(exc), exc.err_code, request_id)
    if request.headers.get("content-type", "").startswith("application/json"):
        return _rest_error(400, "fetching audio from a URL is not supported: send the audio as the request body",
                           "Bad Request", request_id)
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > settings.max_upload_bytes:
            return _rest_error(413, f"body larger than {settings.max_upload_bytes} bytes", "Bad Request", request_id)
    try:
        if options.encoding in RAW:
            decoder = _decoder(options)
            pcm = np.concatenate([decoder.feed(data), decoder.flush()])
        else:
            pcm = await run_in_threadpool(load_audio_bytes, data, max_seconds=settings.max_session_s)
    except DeepgramError as exc:
        return _rest_error(400, str(exc), exc.err_code, request_id)
    except AudioTooLong as exc:
        return _rest_error(413, str(exc), "Bad Request", request_id)
    except AudioFormatError as exc:
        return _rest_error(400, upload_error_detail(exc), "Bad Request", request_id)
    collected = []
    try:
        async for event in session_events(engine, pcm, wait_seconds=settings.http_slot_wait_s,
                                          end_of_turn_threshold=settings.end_of_turn_threshold):
            if isinstance(event, Error):
                return _rest_error(500, event.message, "INTERNAL_SERVER_ERROR", request_id)
            if isinstance(event, (Word, WordEnd)):
                collected.append(event)
    except NoFreeSlot:
        return JSONResponse({"err_code": "TOO_MANY_REQUESTS", "err_msg": "all streams are busy, retry later",
                             "request_id": request_id}, status_code=429, headers={"Retry-After": "5"})
    words = [_result_word(w.text, w.start, w.end) for w in pair_words(collected)]
    model = engine.info
    model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, model.name))
    info = ModelInfo(name=model.name.rstrip("/").split("/")[-1])
    return {
        "metadata": {"transaction_key": "deprecated", "request_id": request_id,
                     "sha256": hashlib.sha256(data).hexdigest(),
                     "created": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                     "duration": round(len(pcm) / SAMPLE_RATE, 4), "channels": 1, "models": [model_uuid],
                     "model_info": {model_uuid: info.model_dump()}},
        "results": {"channels": [{"alternatives": [
            {"transcript": _transcript(words, options.punctuate), "confidence": 1.0,
             "words": [w.model_dump() for w in words]}]}]},
    }
