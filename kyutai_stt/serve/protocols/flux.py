"""Deepgram Flux, conversational speech to text with turns: ``WS /v2/listen``.

Spoken by deepgram-sdk (``client.listen.v2.connect``), Pipecat's ``DeepgramFluxSTTService`` and LiveKit's Deepgram
``STTv2``, each pointed here by its URL option. Messages: ``kyutai_stt.messages.flux``.

The turns are the turn layer's (``stream.turns``, from the model's VAD head), in Flux's state machine
(developers.deepgram.com/docs/flux/state): ``StartOfTurn`` at the first text of a turn, ``Update`` about every
0.25 s of transcribed audio while a turn goes on, ``EagerEndOfTurn`` (with ``eager_eot_threshold``), then either
``TurnResumed`` (text came after it) or ``EndOfTurn`` with the same transcript. An end (eager or not) first
flushes the stream (``stream.flush``), so its message carries every word of the audio so far; ``ForceEndTurn``
does the same at once (``trigger: manual``); ``eot_timeout_ms`` ends a turn that has had no new text for that
long (``trigger: timeout``). ``turn_index`` counts from 0 and moves on after each ``EndOfTurn``. Times
(``audio_window_start/end``) are seconds of the client's audio, flush silences taken out.

Query: ``model`` (a label), ``encoding`` (``linear16``, ``mulaw``, ``alaw``, ``opus``, ``ogg-opus``; none: container
audio) with ``sample_rate`` for raw audio, ``eot_threshold`` (0.5-1.0, default 0.7: the VAD head's pause
probability), ``eager_eot_threshold`` (0.3-0.9, off by default), ``eot_timeout_ms`` (500-10000, default 5000),
``mip_opt_out`` / ``tag`` (labels); ``keyterm``, ``language_hint``, ``redact`` and ``numerals`` /
``profanity_filter`` other than false are refused (HTTP 400, Deepgram's REST error body), as is anything else.
Controls: ``Configure`` (``thresholds``; answered ``ConfigureSuccess``, or ``ConfigureFailure`` for what we cannot
honour, and the stream goes on), ``ForceEndTurn``, ``CloseStream`` (the last words, an ``EndOfTurn`` for a turn
still open, then close 1000). Bad data: an ``Error`` message (``code``, ``description``), then close 1008.
Idle: like Deepgram's ``/v1/listen``, a stream that sends nothing for 10 s is finished and closed (Flux has no
``KeepAlive``: clients send silence, as Pipecat's watchdog does).
"""

from __future__ import annotations

import itertools
import re
import uuid

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ValidationError

from kyutai_stt.audio.decoders import OPUS, StreamDecoder, stream_decoder
from kyutai_stt.audio.errors import AudioFormatError
from kyutai_stt.messages.errors import MessageError, UnknownMessage
from kyutai_stt.messages.events import (EagerEndOfTurn, End, EndOfTurn, Error, Event, SpeechStarted, Step, Text,
    TurnResumed, Word)
from kyutai_stt.messages.flux import (CloseStream, Configure, ConfiguredThresholds, ConfigureFailure,
    ConfigureSuccess, Connected, Control, FatalError, ForceEndTurn, Thresholds, TurnInfo, TurnWord)
from kyutai_stt.serve.protocols import runner
from kyutai_stt.serve.protocols.common import POLICY_VIOLATION, open_session
from kyutai_stt.serve.protocols.deepgram import RAW_FORMATS, DeepgramError, refusal, refuse_query
from kyutai_stt.serve.service import get_service
from kyutai_stt.stream.turns import TurnThresholds, TurnTracker, runner_flush

router = APIRouter()

ENCODINGS = (*RAW_FORMATS, "opus", "ogg-opus")
LABELS = ("model", "mip_opt_out", "tag", "api_key", "auth_id")
FALSE_ONLY = ("numerals", "profanity_filter")
UNSUPPORTED = {"keyterm": "keyterms are not supported by this server",
               "language_hint": "language hints are not supported: the served model detects no language",
               "redact": "redaction is not supported by this server"}
UPDATE_SECONDS = 0.25  # Flux's Update cadence, in transcribed audio
IDLE_SECONDS = 10.0  # Deepgram closes a stream without data after about 10 s (NET-0001)


class FluxOptions(BaseModel):
    encoding: str | None = None
    sample_rate: int | None = None
    eot_threshold: float = 0.7
    eager_eot_threshold: float | None = None
    eot_timeout_ms: int = 5000


def parse_options(params: list[tuple[str, str]]) -> FluxOptions:
    """Every query parameter honoured, accepted as a label, or refused (``DeepgramError``)."""
    options: dict = {}
    thresholds: dict = {}
    seen: set[str] = set()
    for name, value in params:
        if name in seen and name != "tag":
            raise DeepgramError(f"{name} given twice")
        seen.add(name)
        if name == "encoding":
            if value not in ENCODINGS:
                raise DeepgramError(f"encoding {value!r} is not supported here: use one of {', '.join(ENCODINGS)}, "
                                    "or none for container audio")
            options["encoding"] = value
        elif name == "sample_rate":
            if not re.fullmatch(r"[0-9]{4,6}", value) or not 8000 <= int(value) <= 192000:
                raise DeepgramError("sample_rate must be an integer from 8000 to 192000")
            options["sample_rate"] = int(value)
        elif name in ("eot_threshold", "eager_eot_threshold", "eot_timeout_ms"):
            thresholds[name] = value
        elif name in FALSE_ONLY:
            if value.lower() != "false":
                raise DeepgramError(f"{name}={value} is not supported by this server: use false or leave it out")
        elif name in UNSUPPORTED:
            raise DeepgramError(UNSUPPORTED[name])
        elif name not in LABELS:
            raise DeepgramError(f"unknown parameter {name!r}")
    try:
        checked = Thresholds.model_validate(thresholds)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise DeepgramError(f"{first['loc'][0]}: {first['msg']}") from None
    options.update(checked.model_dump(exclude_none=True))
    result = FluxOptions(**options)
    if result.eager_eot_threshold is not None and result.eager_eot_threshold > result.eot_threshold:
        raise DeepgramError("eager_eot_threshold must not be above eot_threshold")
    if result.encoding in RAW_FORMATS and result.sample_rate is None:
        raise DeepgramError(f"sample_rate is required with encoding={result.encoding}")
    if result.encoding not in RAW_FORMATS and result.sample_rate is not None:
        raise DeepgramError("sample_rate is only for raw encodings (linear16, mulaw, alaw)")
    return result


def _decoder(options: FluxOptions) -> StreamDecoder:
    if options.encoding in RAW_FORMATS:
        return stream_decoder(RAW_FORMATS[options.encoding], options.sample_rate)
    return stream_decoder("container" if options.encoding is None else OPUS)


def _thresholds(options: FluxOptions) -> TurnThresholds:
    return TurnThresholds(eot=options.eot_threshold, eager=options.eager_eot_threshold,
                          timeout_s=options.eot_timeout_ms / 1000)


class FluxTranslator(runner.Translator):
    protocol = "flux"
    close_codes = {AudioFormatError: POLICY_VIOLATION, MessageError: POLICY_VIOLATION}
    fault_reason = "NET-0000"

    def __init__(self, options: FluxOptions, request_id: str, info):
        super().__init__(_decoder(options))
        self.options, self.request_id = options, request_id
        self.turns = TurnTracker(info, _thresholds(options), flush=runner_flush)
        self._head = info.end_of_turn_head
        self._lead, self._rate = info.lead_frames, info.frame_rate
        self.sequence = itertools.count()
        self.turn_index = 0
        self.words: list[str] = []  # final words of the current turn
        self.pieces = ""  # text of the word being spelt
        self.in_turn = False
        self.window_start = 0.0  # client time where the current turn's audio window starts
        self.last_update = 0.0  # client time of the last TurnInfo
        self.now = 0.0  # client time transcribed so far
        self.confidence = 0.0  # the VAD head's latest pause probability

    # ------------------------------------------------------------------ client messages
    def parse(self, message: dict) -> list[runner.Input]:
        data = message.get("bytes")
        if data is not None:
            return [runner.End()] if not data else [runner.Audio(data)]
        try:
            control = Control.validate_json(message.get("text") or "")
        except ValidationError:
            raise UnknownMessage('unknown message: send audio as binary messages, or a JSON control '
                                 '{"type": "Configure" | "ForceEndTurn" | "CloseStream"}') from None
        if isinstance(control, CloseStream):
            return [runner.End()]
        if isinstance(control, ForceEndTurn):
            return [runner.Flush(self.turns.force_end())]
        return [runner.Reply([self._configure(control)])]

    def _configure(self, control: Configure) -> str:
        if control.keyterms or control.language_hints or control.numerals:
            what = "keyterms" if control.keyterms else "language_hints" if control.language_hints else "numerals"
            return self._send(ConfigureFailure(request_id=self.request_id, code="UNSUPPORTED",
                                               description=f"{what} is not supported by this server"))
        given = control.thresholds.model_dump(exclude_none=True) if control.thresholds else {}
        merged = self.options.model_copy(update=given)
        if merged.eager_eot_threshold is not None and merged.eager_eot_threshold > merged.eot_threshold:
            return self._send(ConfigureFailure(request_id=self.request_id, code="INVALID_THRESHOLDS",
                                               description="eager_eot_threshold must not be above eot_threshold"))
        self.options = merged
        self.turns.thresholds = _thresholds(merged)
        return self._send(ConfigureSuccess(request_id=self.request_id, thresholds=ConfiguredThresholds(
            eot_threshold=merged.eot_threshold, eager_eot_threshold=merged.eager_eot_threshold,
            eot_timeout_ms=merged.eot_timeout_ms)))

    def idle_timeout(self, settings) -> float:
        return min(settings.idle_timeout_s, IDLE_SECONDS)

    def refuse(self, exc: BaseException, code: int, reason: str) -> tuple[list[str], str]:
        message = str(exc)
        if isinstance(exc, AudioFormatError):
            message = f"the audio could not be decoded as {self.options.encoding or 'container audio'}: {exc}"
        return [self._send(FatalError(code="DATA-0000", description=message))], "DATA-0000"

    # ------------------------------------------------------------------ session events
    def _send(self, message) -> str:
        message.sequence_id = next(self.sequence)
        return message.model_dump_json(exclude_none=True)

    def _info(self, event: str, confidence: float, trigger: str | None = None) -> str:
        self.last_update = self.now
        transcript = " ".join(self.words)
        if event in ("StartOfTurn", "Update", "TurnResumed") and self.pieces.strip():
            transcript = " ".join(filter(None, (transcript, self.pieces.strip())))  # the word being spelt
        return self._send(TurnInfo(
            request_id=self.request_id, event=event, turn_index=self.turn_index,
            audio_window_start=round(self.window_start, 4), audio_window_end=round(max(self.now, self.window_start), 4),
            transcript=transcript, words=[TurnWord(word=w) for w in transcript.split()],
            end_of_turn_confidence=round(confidence, 4), trigger=trigger))

    def render(self, event: Event) -> list[str]:
        match event:
            case Text(text=text):
                self.pieces += text
            case Word(text=text):
                self.words.append(text)
                self.pieces = ""
            case Step(step_idx=frame, pause_probabilities=pauses):
                self.now = self.timeline.client_time(max(0.0, (frame - self._lead) / self._rate))
                if pauses is not None and self._head is not None:
                    self.confidence = pauses[self._head]
                if self.in_turn and self.now - self.last_update >= UPDATE_SECONDS - 1e-9:
                    return [self._info("Update", self.confidence)]
            case SpeechStarted():
                self.in_turn = True
                return [self._info("StartOfTurn", self.confidence)]
            case EagerEndOfTurn(probability=p):
                return [self._info("EagerEndOfTurn", p)]
            case TurnResumed():
                return [self._info("TurnResumed", self.confidence)]
            case EndOfTurn(probability=p, trigger=trigger):
                return [self._end_of_turn(p, trigger)]
            case End() if self.in_turn and self.words:
                return [self._end_of_turn(self.confidence, "close")]
            case Error(message=message):
                return [self._send(FatalError(code="NET-0000", description=message))]
        return []

    def _end_of_turn(self, confidence: float, trigger: str) -> str:
        message = self._info("EndOfTurn", confidence, trigger)
        self.turn_index += 1
        self.words, self.pieces, self.in_turn = [], "", False
        self.window_start = self.now
        return message


@router.websocket("/v2/listen")
async def flux_socket(ws: WebSocket) -> None:
    request_id = str(uuid.uuid4())
    try:
        options = parse_options(list(ws.query_params.multi_items()))
        engine = get_service(ws).engine
        if engine is not None and not engine.info.vad_horizons:
            # Flux is turns, and turns end on the model's VAD head: a model without one (the NeMo family) could
            # only end them on the timeout, which is not what a Flux client asks for
            raise DeepgramError(f"Flux needs end-of-turn detection, and the served model ({engine.info.family} "
                                "family) has no VAD head: use /v1/listen (Finalize ends a segment by hand)")
    except DeepgramError as exc:
        await refuse_query(ws, exc, request_id)
        return
    session = await open_session(ws, "flux", refusal=refusal(request_id))
    if session is None:
        return
    translator = FluxTranslator(options, request_id, get_service(ws).running_engine.info)
    await ws.send_text(translator._send(Connected(request_id=request_id)))
    await runner.run_stream(ws, session, translator)
