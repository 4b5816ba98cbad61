"""OpenAI Realtime transcription at ``WS /v1/realtime?intent=transcription``, as the ``openai`` SDK connects
(``client.realtime.connect(extra_query={"intent": "transcription"})``; ``client.beta.realtime`` too).

Client events (the GA names, and the beta ``transcription_session.update``):
- ``session.update`` / ``transcription_session.update``: input format ``audio/pcm`` at 24 kHz (beta ``pcm16``),
  ``audio/pcmu`` / ``audio/pcma`` (beta ``g711_ulaw`` / ``g711_alaw``, 8 kHz); ``transcription.language`` checked
  against the model's languages; ``transcription.model`` is a label; ``turn_detection`` ``server_vad`` (our VAD
  head; its threshold and durations are not used) or null (commit by hand). ``transcription.prompt`` is read as a
  list of keyterms, comma- or newline-separated, as on the file endpoint (the model takes no text prompt), and
  ``transcription.keywords`` (the SDK's list of words or phrases) adds its own: they
  take effect at the end of the audio appended so far (before any audio: from the start), so the words depend on
  the audio and the events only; too many or too long terms get an ``error`` event. OpenAI's transcription session
  has no temperature: the server's default sampling applies. ``noise_reduction`` or ``include`` (log
  probabilities) is refused with an ``error`` event.
- ``input_audio_buffer.append`` (base64 audio), ``.commit`` (flush now: ``flush.flush_now``; every word of the
  audio so far ends the current item), ``.clear`` (the audio not yet transcribed is flushed and its words dropped).

Server events: ``session.created`` / ``session.updated`` (``transcription_session.*`` for the beta names),
``input_audio_buffer.speech_started`` (the first text of a turn), ``.speech_stopped`` and ``.committed`` (the VAD
head's end of turn, or a commit: without turn detection at once, as OpenAI does, so that an error for a later event
never overtakes it; under server VAD once the audio before the commit is through, since the VAD may still end items in
it), each followed by ``conversation.item.added`` (the user item, its transcript null; beta:
``conversation.item.created``), ``conversation.item.input_audio_transcription.delta`` (each text piece as the model
produces it: those of the audio before a commit go to the committed item, also after ``.committed``) and
``.completed`` (the item's words, once the commit's flush is through), then ``conversation.item.done`` (the item with
its transcript; GA only), ``input_audio_buffer.cleared`` (at once), and ``error`` (``{"type": "error", "error":
{"type", "code", "message", "param", "event_id"}}``): a bad event (unknown type, a setting we cannot honour, audio
that is not base64) is answered with an error and the session goes on, as OpenAI's does; a stream past
``max_session_s`` is closed (1008).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import uuid
from collections import deque
from typing import Any, Callable

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError

from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.audio.decoders import StreamDecoder, stream_decoder
from kyutai_stt.engine.contract import DecodingOptions, split_keyterms
from kyutai_stt.messages import openai_realtime as rt
from kyutai_stt.messages.events import EndOfTurn, Error, Event, Marker, Text, Word
from kyutai_stt.messages.languages import base_language
from kyutai_stt.messages.openai_realtime import Append, Clear, ClientEvent, Commit, SessionUpdate
from kyutai_stt.serve.protocols import runner
from kyutai_stt.serve.protocols.common import close, open_session
from kyutai_stt.serve.protocols.errors import POLICY_VIOLATION
from kyutai_stt.serve.service import get_service
from kyutai_stt.stream.session import Session, SessionLimitError
from kyutai_stt.stream.turns import TurnThresholds, TurnTracker

router = APIRouter()

MIN_COMMIT_MS = 100  # OpenAI's smallest committable buffer

FORMATS = {"audio/pcm": "pcm16", "pcm16": "pcm16", "audio/pcmu": "g711_ulaw", "g711_ulaw": "g711_ulaw",
           "audio/pcma": "g711_alaw", "g711_alaw": "g711_alaw"}


class RealtimeError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


# semantic_vad's eagerness as the pause probability that ends a turn: eager ends turns at a lower one
EAGERNESS = {"low": 0.7, "medium": 0.5, "auto": 0.5, "high": 0.35}
TURN_KEYS = {"server_vad": {"type", "threshold", "silence_duration_ms", "prefix_padding_ms", "create_response",
                            "interrupt_response", "idle_timeout_ms"},
             "semantic_vad": {"type", "eagerness", "create_response", "interrupt_response"}}
OPENAI_THRESHOLD = 0.5  # server_vad's default (and only honoured) activation threshold


class _Config:
    """The transcription session's settings, as the client set them (GA or beta shape)."""

    def __init__(self, languages: tuple[str, ...], horizons: tuple[float, ...], default_eot: float):
        self.languages = languages
        self.horizons = horizons
        self.format = "pcm16"
        self.language: str | None = None
        self.model = "kyutai"
        self.server_vad = bool(horizons)  # a model without a VAD head (the NeMo family): commits only
        self.vad_type = "server_vad"
        self.default_eot = default_eot
        self.eot = default_eot  # pause probability that ends a turn
        self.head: int | None = None  # the VAD head read (None: the model's)
        self.eagerness = "auto"
        self.prefix_padding_ms = 0
        self.prompt: tuple[str, ...] = ()  # transcription.prompt, read as keyterms
        self.keywords: tuple[str, ...] = ()  # transcription.keywords
        self.keyterms: tuple[str, ...] = ()  # both: the stream's

    def update(self, session: dict[str, Any]) -> None:
        if session.get("type") not in (None, "transcription"):
            raise RealtimeError("only transcription sessions are served here (session.type=transcription)",
                                "session.type")
        audio = session.get("audio") or {}
        source = audio.get("input") or {}
        fmt = source.get("format", session.get("input_audio_format"))
        transcription = source.get("transcription", session.get("input_audio_transcription")) or {}
        turn = source.get("turn_detection", session.get("turn_detection", "unset"))
        noise = source.get("noise_reduction", session.get("input_audio_noise_reduction"))
        if session.get("include"):
            raise RealtimeError("include (log probabilities) is not supported", "session.include")
        if noise:
            raise RealtimeError("noise reduction is not supported", "session.audio.input.noise_reduction")
        if fmt is not None:
            name = fmt.get("type") if isinstance(fmt, dict) else fmt
            if name not in FORMATS:
                raise RealtimeError(f"audio format {name!r} is not supported: audio/pcm (24 kHz), audio/pcmu, "
                                    "audio/pcma", "session.audio.input.format")
            if isinstance(fmt, dict) and fmt.get("rate") not in (None, 24000):
                raise RealtimeError("audio/pcm is 24000 Hz", "session.audio.input.format.rate")
            self.format = FORMATS[name]
        if "prompt" in transcription or "keywords" in transcription:
            self._keyterms(transcription)
        if transcription.get("language"):
            if base_language(transcription["language"]) not in self.languages:
                raise RealtimeError(f"language {transcription['language']!r} is not supported by the served model, "
                                    f"which transcribes {', '.join(self.languages)}",
                                    "session.audio.input.transcription.language")
            self.language = base_language(transcription["language"])
        self.model = transcription.get("model") or self.model
        if turn != "unset":
            self._turn_detection(turn)

    def _keyterms(self, transcription: dict) -> None:
        """``prompt`` (a comma/newline-separated list, as on the file endpoint) and ``keywords`` (the SDK's list of
        words or phrases), each kept until the client sets it again: the stream's keyterms are both."""
        param = "session.audio.input.transcription"
        prompt, keywords = self.prompt, self.keywords
        if "prompt" in transcription:
            prompt = split_keyterms(transcription["prompt"] or "")
        if "keywords" in transcription:
            keywords = transcription["keywords"] or []
            if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
                raise RealtimeError("keywords must be a list of strings", f"{param}.keywords")
            keywords = tuple(k.strip() for k in keywords)
        keyterms = tuple(dict.fromkeys(keywords + prompt))
        try:
            DecodingOptions(keyterms=keyterms).check()
        except ValueError as exc:
            which = "prompt" if "prompt" in transcription else "keywords"
            raise RealtimeError(f"{which} (keyterms): {exc}", f"{param}.{which}") from None
        self.prompt, self.keywords, self.keyterms = prompt, keywords, keyterms

    def _turn_detection(self, turn) -> None:
        """server_vad and semantic_vad both read the model's VAD head (its pause probability); null: commits only.
        What the head cannot honour is refused."""
        param = "session.audio.input.turn_detection"
        if turn is None:
            self.server_vad = False
            return
        kind = turn.get("type") if isinstance(turn, dict) else None
        if kind not in TURN_KEYS:
            raise RealtimeError("turn_detection must be server_vad or semantic_vad (the model's VAD head) or null",
                                param)
        if not self.horizons:
            raise RealtimeError(f"turn_detection {kind} needs the model's VAD head, and the served model has none: "
                                "set turn_detection to null and commit the audio buffer", param)
        unknown = sorted(set(turn) - TURN_KEYS[kind])
        if unknown:
            raise RealtimeError(f"turn_detection.{unknown[0]} is not supported with {kind}", f"{param}.{unknown[0]}")
        eot, head, padding = self.default_eot, None, 0
        if kind == "server_vad":
            if turn.get("threshold") not in (None, OPENAI_THRESHOLD):
                raise RealtimeError(f"threshold {turn['threshold']!r} is not supported: speech is detected by the "
                                    f"model's VAD head, at {OPENAI_THRESHOLD} (or leave it out)", f"{param}.threshold")
            if turn.get("idle_timeout_ms") is not None:
                raise RealtimeError("idle_timeout_ms is not supported", f"{param}.idle_timeout_ms")
            silence = turn.get("silence_duration_ms")
            if silence is not None:
                ms = [round(h * 1000) for h in self.horizons]
                if silence not in ms:
                    raise RealtimeError(f"silence_duration_ms must be one of {', '.join(map(str, ms))}: the "
                                        "horizons of the model's VAD heads", f"{param}.silence_duration_ms")
                head = ms.index(silence)
            padding = turn.get("prefix_padding_ms") or 0
            if not isinstance(padding, int) or padding < 0:
                raise RealtimeError("prefix_padding_ms must be a non-negative integer", f"{param}.prefix_padding_ms")
        else:
            eagerness = turn.get("eagerness") or "auto"
            if eagerness not in EAGERNESS:
                raise RealtimeError("eagerness must be low, medium, high or auto", f"{param}.eagerness")
            eot, self.eagerness = EAGERNESS[eagerness], eagerness
        self.server_vad, self.vad_type, self.eot, self.head, self.prefix_padding_ms = True, kind, eot, head, padding

    def thresholds(self) -> TurnThresholds:
        return TurnThresholds(eot=self.eot, head=self.head)

    def describe(self, session_id: str) -> rt.TranscriptionSession:
        fmt = rt.PcmFormat() if self.format == "pcm16" else \
            rt.G711Format(type="audio/pcmu" if self.format == "g711_ulaw" else "audio/pcma")
        return rt.TranscriptionSession(id=session_id, audio=rt.SessionAudio(input=rt.AudioInput(
            format=fmt, transcription=rt.Transcription(model=self.model, language=self.language,
                                                       prompt=", ".join(self.prompt),
                                                       keywords=list(self.keywords) or None),
            turn_detection=self._describe_turns() if self.server_vad else None)))

    def _describe_turns(self) -> rt.TurnDetection | rt.SemanticTurnDetection:
        if self.vad_type == "semantic_vad":
            return rt.SemanticTurnDetection(eagerness=self.eagerness)
        head = self.head if self.head is not None else min(2, len(self.horizons) - 1)
        return rt.TurnDetection(silence_duration_ms=round(self.horizons[head] * 1000) if self.horizons else None,
                                prefix_padding_ms=self.prefix_padding_ms)

    def decoder(self) -> StreamDecoder:
        """Raw PCM16 at 24 kHz, or G.711 at 8 kHz."""
        fmt, rate = {"pcm16": ("pcm_s16le", SAMPLE_RATE), "g711_ulaw": ("mulaw", 8000),
                     "g711_alaw": ("alaw", 8000)}[self.format]
        return stream_decoder(fmt, rate)


class RealtimeTranslator(runner.Translator):
    """Client events in (a bad one is answered with an ``error`` event and the session goes on); the session's
    events become items: ``speech_started``, transcription deltas, then at the end of a turn (or a commit)
    ``committed`` and ``completed`` with the item's words."""

    protocol = "openai_realtime"

    def __init__(self, session: Session, info, default_eot: float,
                 decoding_options: Callable[..., DecodingOptions] = DecodingOptions):
        """``decoding_options(keyterms=...)``: a stream's decoding with the server's defaults
        (``Service.decoding_options``)."""
        self.config = _Config(info.languages, info.vad_horizons, default_eot)
        super().__init__(self.config.decoder())
        # the turn layer without flushes: an automatic commit comes once the turn's last word is final, and the
        # stream's words stay the file mode's
        self.turns = TurnTracker(info, self.config.thresholds())
        self.buffered_ms = 0.0  # audio appended since the last commit (OpenAI refuses to commit under 100 ms)
        self.session = session
        self.session_id = "sess_" + uuid.uuid4().hex[:20]
        self.event_ids = itertools.count(1)
        self.items = itertools.count(1)
        self.markers = itertools.count(1)
        # the commits and clears under way, in order: (marker, "commit" | "clear", the committed item); the
        # session's events belong to the first one's audio until its marker is back
        self.boundaries: deque[tuple[int, str, str | None]] = deque()
        self.marker_ends: dict[int, float] = {}  # marker id -> client seconds where the audio before it ended
        self.audio_from = 0.0  # client seconds where the current item's audio begins (its usage counts from there)
        self.item: str | None = None  # the item the session's events go to now, once it has an id
        self.previous: str | None = None  # the last item committed
        self.item_previous: dict[str, str | None] = {}  # committed items not done yet -> the item before each
        self.beta = False  # the client speaks the beta API (transcription_session.update): its event names
        self.words: list[str] = []
        self.drop = False  # a clear is under way: its words are dropped
        self.delta_sent = False
        self.spelling = ""  # deltas of the word being spelt (its Word not come yet)
        self.carried = 0  # words whose deltas went out with an item that is over: their Word is not added again
        self.client_event_id: str | None = None  # of the client event being handled
        self.decoding_options = decoding_options
        self.keyterms: tuple[str, ...] = ()  # the stream's, as last sent to the session

    def emit(self, event: rt.ServerEvent) -> str:
        event.event_id = f"event_{next(self.event_ids)}"
        return event.model_dump_json()

    def error(self, message: str, param: str | None = None, code: str = "invalid_value",
              event_id: str | None = None) -> str:
        return self.emit(rt.ServerError(error=rt.ErrorDetail(code=code, message=message, param=param,
                                                             event_id=event_id)))

    def created(self) -> str:
        return self.emit(rt.SessionCreated(session=self.config.describe(self.session_id)))

    def parse(self, message: dict) -> list[runner.Input]:
        self.client_event_id = None
        try:
            event = ClientEvent.validate_json(message.get("text") or message.get("bytes") or b"")
        except ValidationError as exc:
            kind = "unknown"
            first = exc.errors()[0] if exc.errors() else {}
            if first.get("type") == "union_tag_invalid":
                kind = str(first.get("input", {}).get("type") if isinstance(first.get("input"), dict) else "")
            return [runner.Reply([self.error(f"invalid client event ({kind or 'not JSON'}): expected session.update, "
                                             "input_audio_buffer.append, .commit or .clear", None, "invalid_event")])]
        self.client_event_id = event.event_id
        try:
            return self._inputs(event)
        except RealtimeError as exc:
            return [runner.Reply([self.error(str(exc), exc.param, exc.code, event.event_id)])]

    def _inputs(self, event) -> list[runner.Input]:
        if isinstance(event, SessionUpdate):
            before = self.config.format
            self.config.update(event.session)
            inputs: list[runner.Input] = []
            if self.config.format != before:
                inputs.append(runner.Configure(self.config.decoder()))
            if self.config.keyterms != self.keyterms:  # also those of an earlier update refused for another field
                self.keyterms = self.config.keyterms
                inputs.append(runner.Decode(self.decoding_options(keyterms=self.keyterms)))
            self.turns.thresholds = self.config.thresholds()
            beta = self.beta = event.type.startswith("transcription_session")
            updated = rt.SessionUpdated(type="transcription_session.updated" if beta else "session.updated",
                                        session=self.config.describe(self.session_id))
            return inputs + [runner.Reply([self.emit(updated)])]
        if isinstance(event, Append):
            try:
                audio = base64.b64decode(event.audio, validate=True)
            except (binascii.Error, ValueError):
                raise RealtimeError("audio must be base64", "audio") from None
            self.buffered_ms += len(audio) / (48 if self.config.format == "pcm16" else 8)
            return [runner.Audio(audio)]
        if isinstance(event, Commit) and self.buffered_ms < MIN_COMMIT_MS:
            # as OpenAI: no item, nothing fed to the model
            raise RealtimeError(f"Error committing input audio buffer: buffer too small. Expected at least "
                                f"{MIN_COMMIT_MS} ms of audio, but buffer only has {self.buffered_ms:.2f} ms of audio.",
                                None, "input_audio_buffer_commit_empty")
        if isinstance(event, (Commit, Clear)):
            # the events before the flush's marker are still the committed (or cleared) audio's; the answer goes
            # out at once where that is known now, as OpenAI's does (an error for a later event must not overtake it)
            self.buffered_ms = 0.0
            marker = next(self.markers)
            if isinstance(event, Clear):
                self.boundaries.append((marker, "clear", None))
                self.drop = self.drop or len(self.boundaries) == 1
                return [runner.Reply([self.emit(rt.Cleared())]), runner.Flush(marker)]
            if self.config.server_vad:  # the VAD may still end turns (items) in the audio before it: which item
                self.boundaries.append((marker, "commit", None))  # it commits is known once that audio is through
                return [runner.Flush(marker)]
            # the item receiving events now, or (behind earlier commits or clears) the one after them
            item = self._item_id() if not self.boundaries else f"item_{next(self.items)}"
            self.boundaries.append((marker, "commit", item))
            return [runner.Reply(self._committed(item)), runner.Flush(marker)]
        return []

    def idle_timeout(self, settings) -> None:
        """OpenAI does not close an idle Realtime session (a push-to-talk client is silent between turns); only
        ``max_session_s`` of audio bounds it, and the WebSocket pings find a dead peer."""
        return None

    def refuse(self, exc: BaseException, code: int, reason: str) -> tuple[list[str], str]:
        kind = "session_limit" if isinstance(exc, SessionLimitError) else "invalid_value"
        return [self.error(str(exc), None, kind, self.client_event_id)], reason

    def _item_id(self) -> str:
        if self.item is None:
            self.item = f"item_{next(self.items)}"
        return self.item

    def flushed(self, marker: int, end: float) -> None:
        self.marker_ends[marker] = end

    def _end_item(self, end: float, committed: bool = False) -> list[str]:
        """The current item is over, its audio ending at ``end`` (client seconds): committed (unless a commit
        already said so), then its transcript (its ``usage``: the item's own audio, as OpenAI counts it, not the
        flush silence nor earlier items)."""
        if self.item is None:
            return []
        item = self.item
        seconds, self.audio_from = max(0.0, end - self.audio_from), max(self.audio_from, end)
        words = self.words
        if self.spelling.strip():  # its deltas went out with this item: so does the word (its Word comes later)
            words = words + [self.spelling.strip()]
            self.carried += 1
        self.spelling = ""
        out = [] if committed else self._committed(item)
        transcript = " ".join(words)
        out.append(self.emit(rt.TranscriptionCompleted(item_id=item, transcript=transcript, usage=rt.Usage(
            seconds=round(seconds, 3)))))
        previous = self.item_previous.pop(item, None)
        if not self.beta:  # the beta API had no item.done
            out.append(self.emit(rt.ItemDone(previous_item_id=previous, item=rt.UserItem(
                id=item, content=[rt.InputAudio(transcript=transcript)]))))
        self.item, self.words, self.delta_sent = None, [], False
        return out

    def _committed(self, item: str) -> list[str]:
        """``committed``, then the item added to the conversation (OpenAI's order), after the last committed one."""
        previous, self.previous = self.previous, item
        self.item_previous[item] = previous
        added = rt.ItemAdded(type="conversation.item.created" if self.beta else "conversation.item.added",
                             previous_item_id=previous, item=rt.UserItem(id=item, content=[rt.InputAudio()]))
        return [self.emit(rt.Committed(item_id=item, previous_item_id=previous)), self.emit(added)]

    def _next_boundary(self) -> None:
        """The events from now on go to the next commit's item, are dropped (a clear), or go to a new item."""
        if self.boundaries:
            _, kind, item = self.boundaries[0]
            self.item, self.drop = item, kind == "clear"
        else:
            self.drop = False

    def render(self, event: Event) -> list[str]:
        if isinstance(event, Error):
            return [self.error(event.message, None, "server_error")]
        if isinstance(event, Marker) and self.boundaries and event.id == self.boundaries[0][0]:
            _, kind, item = self.boundaries.popleft()
            end = self.marker_ends.pop(event.id, self.audio_from)
            out = []
            if kind == "clear":
                self.item, self.words, self.delta_sent, self.spelling = None, [], False, ""
                self.audio_from = max(self.audio_from, end)
            elif item is None:  # a commit under server VAD: committed now, in the stream's order
                self._item_id()
                out = self._end_item(end)
            else:
                out = self._end_item(end, committed=True)
            self._next_boundary()
            return out
        if self.drop:
            return []
        out = []
        if isinstance(event, Text):
            if self.item is None and self.config.server_vad:
                start = self.timeline.client_time(event.time) * 1000 - self.config.prefix_padding_ms
                out.append(self.emit(rt.SpeechStarted(item_id=self._item_id(),
                                                      audio_start_ms=max(0, round(start)))))
            delta = event.text if self.delta_sent else event.text.lstrip()
            self.delta_sent = True
            self.spelling += event.text
            out.append(self.emit(rt.TranscriptionDelta(item_id=self._item_id(), delta=delta)))
        elif isinstance(event, Word):
            self.spelling = ""
            if self.carried:  # already in the item it was spelt in
                self.carried -= 1
                return out
            self._item_id()
            self.words.append(event.text)
        elif isinstance(event, EndOfTurn) and self.config.server_vad and self.item is not None:
            self.buffered_ms = 0.0  # the automatic commit
            end = self.timeline.client_time(event.time)
            out.append(self.emit(rt.SpeechStopped(item_id=self.item, audio_end_ms=round(end * 1000))))
            out += self._end_item(end)
        return out


@router.websocket("/v1/realtime")
async def realtime_socket(ws: WebSocket) -> None:
    intent = ws.query_params.get("intent")
    service = get_service(ws)
    session = await open_session(ws, "openai_realtime", decoding=service.decoding_options())
    if session is None:
        return
    translator = RealtimeTranslator(session, service.running_engine.info, service.settings.end_of_turn_threshold,
                                    service.decoding_options)
    if intent != "transcription":
        await ws.send_text(translator.error("only transcription sessions are served here: connect with "
                                            "?intent=transcription", "intent", "unsupported_intent"))
        session.abort()
        await close(ws, POLICY_VIOLATION, "only intent=transcription is supported")
        return
    await ws.send_text(translator.created())
    await runner.run_stream(ws, session, translator)
