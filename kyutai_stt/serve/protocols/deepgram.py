"""Deepgram-compatible speech to text: streaming ``WS /v1/listen`` and pre-recorded ``POST /v1/listen``.

Spoken by deepgram-sdk (``client.listen.v1.connect``), LiveKit's Deepgram STT plugin and Pipecat's
DeepgramSTTService, each pointed here by its base-URL option. Message shapes follow Deepgram's public API reference
(developers.deepgram.com/reference/speech-to-text/listen-streaming) and the typed models of deepgram-sdk 7.

Mapping onto our session events:
- ``Results`` with ``is_final: false`` (``interim_results=true``): the words not final yet, i.e. the last complete
  word whose end is still unknown plus the pieces of the word being recognised (``Text`` events).
- ``Results`` with ``is_final: true``: one per final word, sent once its end is known (``Word`` + ``WordEnd``),
  so final words come in order with the same text and times as every other protocol.
- Ends of turn come from the turn layer (``stream.turns``, one tracker per channel, no flush: word times stay the
  file's), which holds an end until the word being spelt is complete. A turn's end never comes before its last
  word is final: ``speech_final: true`` goes on the final result of the turn's last word (an empty final result
  when that word was already out), unless ``endpointing=false``; ``UtteranceEnd`` (when ``utterance_end_ms`` is
  given) right after that result, with ``last_word_end`` that word's end (Deepgram's field: the end of the last
  word before the gap). ``SpeechStarted``
  (``vad_events=true``) with the first text of a turn.
- ``Finalize``: the stream is flushed without ending (``flush.flush_now``, the minimal flush); the words final
  from then until its marker comes back (every word of the audio so far, the last one closed where the audio
  ended, exactly as at the end of a stream) go out together in one ``from_finalize: true`` result, as Deepgram
  sends them (empty when there were none). The stream stays open; the silence is not counted in later timestamps.
- ``CloseStream`` (or an empty binary message): flush, the last words, ``Metadata``, close 1000. ``KeepAlive``
  resets the idle timer: as at Deepgram, 10 s without any message finishes the stream (its words still come) and
  closes it (1008; a shorter ``idle_timeout_s`` setting wins).
- ``multichannel=true`` with ``channels`` 2 to 8 of a raw encoding: each channel is transcribed on its own (an
  engine slot each, the same words as that channel sent alone) and gets its own ``Results``, ``SpeechStarted`` and
  ``UtteranceEnd`` with ``channel_index: [channel, channels]``; ``Finalize`` finalizes every channel. Without it,
  the channels are mixed down. Pre-recorded requests refuse ``multichannel=true``.
- ``diarize=true`` (a server started with ``--diarizer``): every word carries ``speaker`` (``stream.speakers``:
  a word comes once the diarizer has heard its whole span, about 0.5 s later than without).
- ``confidence`` is 1.0: decoding is greedy and the engine does not report token probabilities.

Errors: a bad query parameter is refused at the handshake with HTTP 400 and Deepgram's REST error body
(``{"err_code", "err_msg", "request_id"}``); bad data in the stream gets an ``Error`` message
(``{"type": "Error", "variant", "description", "message"}``) then close 1008 (``DATA-0000``, as Deepgram does).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import uuid
from datetime import datetime, timezone
from typing import Annotated, Callable

import numpy as np
from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from kyutai_stt.engine.contract import MAX_KEYTERM_CHARS, MAX_KEYTERMS
from kyutai_stt.engine.contract import ModelInfo as EngineInfo
from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.audio.errors import AudioFormatError
from kyutai_stt.audio.decoders import OPUS, StreamDecoder, stream_decoder
from kyutai_stt.messages.languages import base_language
from kyutai_stt.messages.deepgram import (
    Alternative,
    CloseStream,
    Control,
    Finalize,
    Metadata,
    ModelInfo,
    PrerecordedChannel,
    PrerecordedMetadata,
    PrerecordedResponse,
    PrerecordedResults,
    RestError,
    ResultChannel,
    ResultMetadata,
    Results,
    ResultWord,
    SpeechStarted,
    StreamError,
    UtteranceEnd,
)
from kyutai_stt.messages.errors import MessageError, UnknownMessage
from kyutai_stt.messages.events import MAX_CHANNELS, EndOfTurn, Error, Marker, Text, Word, WordEnd
from kyutai_stt.serve.protocols import runner
from kyutai_stt.serve.protocols.common import POLICY_VIOLATION, deny, deny_unauthorized, open_session
from kyutai_stt.serve.service import get_service
from kyutai_stt.serve.uploads import (
    HttpProblem,
    Upload,
    authorized,
    read_body,
    routes_rendering,
    transcribe,
)
from kyutai_stt.stream.session import Session
from kyutai_stt.stream.turns import TurnThresholds, TurnTracker
from kyutai_stt.stream.words import TimedWord, WordPairer, pair_words

router = APIRouter()

FLAGS = {"true": True, "false": False}
IDLE_SECONDS = 10.0  # Deepgram's idle close (NET-0001): no audio and no KeepAlive for this long
RAW_FORMATS = {"linear16": "pcm_s16le", "mulaw": "mulaw", "alaw": "alaw"}  # ours, for Deepgram's raw encodings
RAW = tuple(RAW_FORMATS)
ENCODINGS = RAW + ("opus", "ogg-opus")
# Accepted only with the value that matches what we do (the others are refused: we cannot honour them).
FIXED = {"smart_format": "false", "numerals": "false", "profanity_filter": "false",
         "dictation": "false", "detect_entities": "false", "filler_words": "true",
         "detect_language": "false", "version": "latest"}
WHY_FIXED = {"filler_words": "the model writes what it hears, filler words included",
             "version": "only the served model's latest version exists"}
# Accepted with any value, and why each changes nothing here.
LABELS = {"model": "the served model answers whatever the name (Metadata.model_info says which)",
          "no_delay": "only matters with smart_format", "mip_opt_out": "nothing is sent anywhere",
          "tag": "no usage reporting", "auth_id": "our API key", "api_key": "our API key"}
UNSUPPORTED = ("keywords", "search", "replace", "redact", "callback", "callback_method", "extra",
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
    channels: int = 1  # of raw audio, interleaved
    multichannel: bool = False  # each channel transcribed on its own (else mixed down)
    diarize: bool = False  # words carry ``speaker`` (a server with a diarizer)
    keyterms: list[str] = []  # keyterm=..., repeated: terms the engine favours


def _flag(name: str, value: str) -> bool:
    if value.lower() not in FLAGS:
        raise DeepgramError(f"{name} must be true or false, not {value!r}")
    return FLAGS[value.lower()]


def parse_options(params: list[tuple[str, str]], languages: tuple[str, ...], streaming: bool) -> ListenOptions:
    """Check every query parameter: honoured, accepted as a label (``LABELS``), or refused (``DeepgramError``)."""
    options = ListenOptions()
    seen: set[str] = set()
    for name, value in params:
        if name in seen and name not in ("tag", "keyterm"):
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
        elif name == "keyterm":
            if not value.strip() or len(value) > MAX_KEYTERM_CHARS or len(options.keyterms) >= MAX_KEYTERMS:
                raise DeepgramError(f"keyterm: at most {MAX_KEYTERMS} terms of 1 to {MAX_KEYTERM_CHARS} characters")
            options.keyterms.append(value.strip())
        elif name == "channels":
            if not re.fullmatch(r"[1-8]", value):
                raise DeepgramError(f"channels must be an integer from 1 to {MAX_CHANNELS}")
            options.channels = int(value)
        elif name in ("interim_results", "punctuate", "vad_events", "multichannel", "diarize"):
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
    if options.channels > 1 and options.encoding not in RAW:
        raise DeepgramError("channels is only for raw encodings (linear16, mulaw, alaw): a container declares its own")
    if options.diarize and options.multichannel and options.channels > 1:
        raise DeepgramError("diarize=true and multichannel=true cannot be combined here: a channel is a speaker")
    if options.multichannel and not streaming:
        raise DeepgramError("multichannel=true is supported on streaming (WebSocket) requests only")
    if options.encoding not in RAW and options.sample_rate is not None and streaming:
        raise DeepgramError("sample_rate is only for raw encodings (linear16, mulaw, alaw)")
    return options


def rest_error(status: int, message: str, err_code: str, request_id: str) -> JSONResponse:
    body = RestError(err_code=err_code, err_msg=message, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status)


def _plain(text: str) -> str:
    """Deepgram's ``word``: lower case, without punctuation (``punctuated_word`` keeps the model's spelling). A
    word the model spelt with a space inside (pieces with no padding between them) keeps it."""
    return " ".join(re.sub(r"[^\w'\s-]+", "", text.lower()).split()) or text.lower()


def _result_word(text: str, start: float, end: float, speaker: int | None = None) -> ResultWord:
    return ResultWord(word=_plain(text), start=round(start, 4), end=round(end, 4), punctuated_word=text,
                      speaker=speaker)


def _transcript(words: list[ResultWord], punctuate: bool) -> str:
    return " ".join(w.punctuated_word if punctuate else w.word for w in words)


# ----------------------------------------------------------------------------- audio input
def _decoder(options: ListenOptions) -> StreamDecoder:
    """Raw encodings at their declared rate, Ogg/Opus, or (no encoding) container audio that FFmpeg probes. A
    ``Finalize`` flushes what the decoder can release mid-stream: a raw resampler's tail; nothing for Ogg pages
    (decoded whole) or containers (their resampler holds back under 0.1 s until the end)."""
    if options.encoding in RAW:
        return stream_decoder(RAW_FORMATS[options.encoding], options.sample_rate, options.channels,
                              split_channels=options.multichannel and options.channels > 1)
    return stream_decoder("container" if options.encoding is None else OPUS)


# ----------------------------------------------------------------------------- streaming
class _Transcript:
    """Turns session events into Deepgram messages for one stream (see the module docstring for the rules)."""

    def __init__(self, options: ListenOptions, request_id: str, model_name: str, model_uuid: str,
                 channel_index: tuple[int, int] = (0, 1), turns: TurnTracker | None = None):
        self.options = options
        self.turns = turns  # this channel's turn layer (None: the events' own ends of turn are used as they come)
        self.channel_index = list(channel_index)  # [this channel, channels]
        self.metadata = ResultMetadata(request_id=request_id, model_info=ModelInfo(name=model_name),
                                       model_uuid=model_uuid)
        self.words = WordPairer()  # its pending word: complete, end not known yet
        self.pieces: list[Text] = []  # the word being recognised
        self.speakers: list[int | None] = []  # of the words fed to the pairer, not yet final (diarize=true)
        self.cursor = 0.0  # end of the last final result
        self.last_word_end = 0.0  # end of the last final word (an UtteranceEnd's last_word_end)
        self.in_turn = False
        self.speech_final_due = False  # the pending word is the last of a turn that has ended
        self.utterance_end_due = False  # an UtteranceEnd goes right after that word's final result
        self.finalizing = 0  # Finalize requests whose flush is under way
        self.held: list[ResultWord] = []  # final words that came during them
        self.shift: Callable[[float], float] = lambda t: t

    def _results(self, words: list[ResultWord], is_final: bool, end: float, from_finalize: bool = False) -> Results:
        speech_final = False
        if is_final and self.speech_final_due and self.options.endpointing:
            speech_final, self.speech_final_due = True, False
        start = self.cursor if is_final else (words[0].start if words else self.cursor)
        # from the rounded times: start + duration is the rounded end, so results tile in what the client reads
        return Results(channel_index=self.channel_index, duration=round(max(0.0, round(end, 4) - round(start, 4)), 4),
                       start=round(start, 4), is_final=is_final,
                       speech_final=speech_final, from_finalize=from_finalize,
                       channel=ResultChannel(alternatives=[Alternative(
                           transcript=_transcript(words, self.options.punctuate), words=words)]),
                       metadata=self.metadata)

    def _final(self, word: TimedWord) -> list[BaseModel]:
        start = self.shift(word.start)
        end = max(self.shift(word.end), start)
        result = _result_word(word.text, start, end, self.speakers.pop(0) if self.speakers else None)
        if self.finalizing:  # released by a Finalize under way: they go in its from_finalize result
            self.held.append(result)
            return []
        message = self._results([result], True, end)
        self.cursor = self.last_word_end = end
        return [message, *self._turn_ended()]

    def _turn_ended(self) -> list[BaseModel]:
        """The turn's last word has gone out as final: its ``UtteranceEnd`` may follow, at that word's end."""
        self.speech_final_due = False
        due, self.utterance_end_due = self.utterance_end_due, False
        return [UtteranceEnd(channel=self.channel_index, last_word_end=round(self.last_word_end, 4))] if due else []

    def on_event(self, event) -> list[BaseModel]:
        out: list[BaseModel] = []
        for item in self.turns.feed(event) if self.turns is not None else (event,):
            out += self._on_event(item)
        return out

    def _on_event(self, event) -> list[BaseModel]:
        out: list[BaseModel] = []
        if isinstance(event, Text):
            if not self.in_turn:
                self.in_turn = True
                if self.options.vad_events:
                    out.append(SpeechStarted(channel=self.channel_index, timestamp=round(self.shift(event.time), 4)))
            self.pieces.append(event)
            out += self._interim()
        elif isinstance(event, (Word, WordEnd)):
            if isinstance(event, Word):
                self.pieces = []
                self.speakers.append(event.speaker)
            self.words.feed(event)
            final, self.words.words = self.words.words, []  # sent once: the pairer keeps none
            for word in final:
                out += self._final(word)
        elif isinstance(event, EndOfTurn):
            self.in_turn = False
            self.speech_final_due = True
            if self.options.utterance_end:
                self.utterance_end_due = True
            if self.words.pending is None and not self.finalizing:  # its last word is already out: say so now
                if self.options.endpointing:
                    out.append(self._results([], True, self.cursor))
                out += self._turn_ended()
        return out

    def _interim(self) -> list[BaseModel]:
        if not self.options.interim_results:
            return []
        words = []
        now = self.shift(self.pieces[-1].time) if self.pieces else self.cursor
        pending = self.words.pending
        if pending is not None:
            words.append(_result_word(pending.text, self.shift(pending.start_time), now,
                                      self.speakers[0] if self.speakers else None))
        if self.pieces:
            text = "".join(p.text for p in self.pieces).strip()
            if text:
                words.append(_result_word(text, self.shift(self.pieces[0].time), now))
        return [self._results(words, False, now)] if words else []

    def finalize(self) -> None:
        """A Finalize's flush was fed: the words it releases are held for its from_finalize result."""
        self.finalizing += 1

    def finalized(self, audio_end: float) -> list[BaseModel]:
        """The Finalize's marker is back: every word heard before it goes out in one ``from_finalize`` result, as
        Deepgram sends it, covering all the audio up to the Finalize (``audio_end``, client seconds: a final is
        "a transcript of all audio up to that point", so the next result starts there, silence or not). The
        finalizing marker closed the words (``WordEnd`` before it), so no word is pending here (a Finalize with no
        audio since the last one: the words its tail spelt, or none)."""
        self.finalizing = max(0, self.finalizing - 1)
        words, self.held = self.held, []
        if words:
            self.last_word_end = words[-1].end
        end = max(self.cursor, audio_end, *(w.end for w in words[-1:]))
        message = self._results(words, True, end, from_finalize=True)
        self.cursor = end
        return [message, *self._turn_ended()]

    def release(self) -> list[BaseModel]:
        """The stream ends with a Finalize still under way: its words go out as ordinary finals."""
        words, self.held, self.finalizing = self.held, [], 0
        if not words:
            return []
        message = self._results(words, True, words[-1].end)
        self.cursor = self.last_word_end = words[-1].end
        return [message, *self._turn_ended()]


class DeepgramTranslator(runner.Translator):
    """Binary messages are audio (an empty one ends it); text messages are the controls. Bad data is told in an
    ``Error`` message, then closed with 1008 ``DATA-0000``, as Deepgram does."""

    protocol = "deepgram"
    close_codes = {AudioFormatError: POLICY_VIOLATION, MessageError: POLICY_VIOLATION}
    fault_reason = "NET-0000"

    def __init__(self, session: Session, options: ListenOptions, request_id: str, info: EngineInfo,
                 end_of_turn_threshold: float):
        super().__init__(_decoder(options))
        self.session, self.options, self.request_id = session, options, request_id
        model_name = info.name
        self.model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, model_name))
        # one transcript per channel (multichannel: Results per channel, with its channel_index, as Deepgram sends)
        channels = options.channels if options.multichannel else 1
        self.transcripts = [_Transcript(options, request_id, model_name.rstrip("/").split("/")[-1], self.model_uuid,
                                        (c, channels), TurnTracker(info, TurnThresholds(eot=end_of_turn_threshold)))
                            for c in range(channels)]
        for transcript in self.transcripts:
            transcript.shift = self.timeline.client_time
        self.transcript = self.transcripts[0]
        self.digest = hashlib.sha256()
        self.created = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        self.markers = itertools.count(1)
        self.finalizes: dict[int, float] = {}  # the Finalizes under way: marker id -> client seconds of audio before it

    def parse(self, message: dict) -> list[runner.Input]:
        data = message.get("bytes")
        if data is not None:
            if not data:  # Deepgram's older close signal
                return [runner.End()]
            self.digest.update(data)
            return [runner.Audio(data)]
        try:
            control = Control.validate_json(message.get("text") or "")
        except ValidationError:
            raise UnknownMessage('unknown message: send audio as binary messages, or a JSON control '
                                 '{"type": "KeepAlive" | "Finalize" | "CloseStream"}') from None
        if isinstance(control, CloseStream):
            return [runner.End()]
        if isinstance(control, Finalize):
            return [runner.Flush(next(self.markers))]
        return []  # KeepAlive: reading it reset the idle timer

    def flushed(self, marker: int, end: float) -> None:
        self.finalizes[marker] = end
        for transcript in self.transcripts:
            transcript.finalize()

    def idle_timeout(self, settings) -> float:
        """Deepgram closes a stream that sends neither audio nor ``KeepAlive`` for about 10 s (NET-0001)."""
        return min(settings.idle_timeout_s, IDLE_SECONDS)

    def render(self, event) -> list[str]:
        if isinstance(event, Error):
            return [_stream_error("NET-0000", event.message)]
        if isinstance(event, Marker) and event.id in self.finalizes:
            end = self.finalizes.pop(event.id)
            items = [item for transcript in self.transcripts for item in transcript.finalized(end)]
        else:
            items = self.transcripts[getattr(event, "channel", None) or 0].on_event(event)
        return [item.model_dump_json() for item in items]

    def finish(self) -> list[str]:
        duration = self.timeline.client_time(self.session.samples_received / SAMPLE_RATE)
        released = [item.model_dump_json() for transcript in self.transcripts for item in transcript.release()]
        return released + [Metadata(request_id=self.request_id, sha256=self.digest.hexdigest(), created=self.created,
                                    channels=len(self.transcripts), duration=round(duration, 4),
                                    models=[self.model_uuid],
                                    model_info={self.model_uuid: self.transcript.metadata.model_info}
                                    ).model_dump_json()]

    def refuse(self, exc: BaseException, code: int, reason: str) -> tuple[list[str], str]:
        message = str(exc)  # whole: the close reason is cut to fit a close frame, the Error message is not
        if isinstance(exc, AudioFormatError):
            message = f"the audio could not be decoded as {self.options.encoding or 'container audio'}: {exc}"
        return [_stream_error("DATA-0000", message)], "DATA-0000"


def _stream_error(variant: str, message: str) -> str:
    return StreamError(variant=variant, description=message, message=message).model_dump_json()


@router.websocket("/v1/listen")
async def listen_socket(ws: WebSocket) -> None:
    request_id = str(uuid.uuid4())
    engine = get_service(ws).running_engine
    try:
        options = parse_options(list(ws.query_params.multi_items()), engine.info.languages, streaming=True)
        if options.diarize and get_service(ws).diarizer is None:
            raise DeepgramError("diarize=true needs a server started with a diarizer (--diarizer)")
    except DeepgramError as exc:
        await refuse_query(ws, exc, request_id)
        return
    session = await open_session(ws, "deepgram", channels=options.channels if options.multichannel else 1,
                                 diarize=options.diarize, refusal=refusal(request_id),
                                 decoding=get_service(ws).decoding_options(keyterms=tuple(options.keyterms)))
    if session is None:
        return
    threshold = get_service(ws).settings.end_of_turn_threshold
    await runner.run_stream(ws, session, DeepgramTranslator(session, options, request_id, engine.info, threshold))


def refusal(request_id: str):
    """A refused /v1/listen or /v2/listen upgrade in Deepgram's REST error shape (``common.Refusal``)."""
    def render(status: int, message: str) -> JSONResponse:
        if status == 401:
            return rest_error(401, "Invalid credentials.", "INVALID_AUTH", request_id)
        return rest_error(status, message, "FORBIDDEN" if status == 403 else "Bad Request", request_id)
    return render


async def refuse_query(ws: WebSocket, exc: DeepgramError, request_id: str) -> None:
    """A refused query: 401 first for a client without a key, else 400 with Deepgram's error code."""
    if not await deny_unauthorized(ws, refusal(request_id)):
        await deny(ws, rest_error(400, str(exc), exc.err_code, request_id), str(exc))


# ----------------------------------------------------------------------------- pre-recorded
def render_error(request: Request, problem: HttpProblem) -> JSONResponse:
    """An HTTP error in Deepgram's REST shape, with Deepgram's codes (a full server is 429 there)."""
    request_id = getattr(request.state, "request_id", None) or str(uuid.uuid4())
    status, message, err_code = problem.status_code, problem.message, problem.code or "Bad Request"
    if problem.reason == "unauthorized":
        message, err_code = "Invalid credentials.", "INVALID_AUTH"
    elif problem.reason == "busy":
        status, err_code = 429, "TOO_MANY_REQUESTS"
    elif status >= 500:
        err_code = "INTERNAL_SERVER_ERROR"
    body = RestError(err_code=err_code, err_msg=message, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=problem.headers)


def _request_id(request: Request) -> str:
    """Dependency: the id this request is known by, in its answer or its error (set first: errors need it)."""
    request.state.request_id = str(uuid.uuid4())
    return request.state.request_id


def _prerecorded_options(request: Request) -> ListenOptions:
    """Dependency: the query parameters of a pre-recorded request (the streaming-only ones are ignored)."""
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("interim_results", "vad_events",
                                                                                "endpointing", "utterance_end_ms")]
    try:
        options = parse_options(params, get_service(request).running_engine.info.languages, streaming=False)
    except DeepgramError as exc:
        raise HttpProblem(400, str(exc), code=exc.err_code) from None
    if request.headers.get("content-type", "").startswith("application/json"):
        raise HttpProblem(400, "fetching audio from a URL is not supported: send the audio as the request body")
    return options


async def _listen_upload(request: Request, options: Annotated[ListenOptions, Depends(_prerecorded_options)]) -> Upload:
    """Dependency: the body as audio, raw samples when ``encoding`` says so (any container otherwise)."""
    if options.encoding not in RAW:
        return await read_body(request)
    try:
        decoder = _decoder(options)
    except DeepgramError as exc:
        raise HttpProblem(400, str(exc), code=exc.err_code) from None
    return await read_body(request, raw=lambda data: np.concatenate([decoder.feed(data), decoder.flush()]))


http_router = APIRouter(route_class=routes_rendering(render_error))


@http_router.post("/v1/listen", dependencies=[Depends(_request_id), Depends(authorized)],
                  response_model=PrerecordedResponse)
async def listen_file(request: Request, request_id: Annotated[str, Depends(_request_id)],
                      options: Annotated[ListenOptions, Depends(_prerecorded_options)],
                      upload: Annotated[Upload, Depends(_listen_upload)]):
    """Deepgram's pre-recorded API: the audio file is the request body (any format we decode; raw audio with
    ``encoding`` and ``sample_rate``). A JSON body with a ``url`` is refused: this server fetches nothing."""
    if options.diarize and get_service(request).diarizer is None:
        raise HttpProblem(400, "diarize=true needs a server started with a diarizer (--diarizer)",
                          code="INVALID_QUERY_PARAMETER")
    decoding = get_service(request).decoding_options(keyterms=tuple(options.keyterms))
    events = await transcribe(request, upload, diarize=options.diarize, decoding=decoding)
    speakers = [e.speaker for e in events if isinstance(e, Word)]  # one per paired word, in order
    words = [_result_word(w.text, w.start, w.end, speaker)
             for w, speaker in zip(pair_words(events), speakers)]
    model = get_service(request).running_engine.info
    model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, model.name))
    return PrerecordedResponse(
        metadata=PrerecordedMetadata(
            request_id=request_id, sha256=upload.sha256,
            created=datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            duration=round(upload.duration, 4), models=[model_uuid],
            model_info={model_uuid: ModelInfo(name=model.name.rstrip("/").split("/")[-1])}),
        results=PrerecordedResults(channels=[PrerecordedChannel(alternatives=[
            Alternative(transcript=_transcript(words, options.punctuate), words=words)])]))


router.include_router(http_router)
