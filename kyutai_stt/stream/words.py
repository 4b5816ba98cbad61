"""From text tokens to words with times: a pure function of the token stream and the model's ``ModelInfo``.

The model's description says which token is padding (no new text), which marks a word boundary (a new word starts
at this step) and from which id on tokens are sentencepiece pieces (the defaults here are Kyutai's: 3, 0 and 4).
Pieces become text the way sentencepiece decodes them: "▁" is a space, a byte-fallback piece ``<0xNN>`` is one
byte, and a word's bytes are UTF-8 across its pieces (an "é" may be two byte pieces). Only the pieces' strings are
needed (``ModelInfo.pieces``), so worker processes, which have no tokenizer, decode alike.

Words follow Kyutai's own server (``State::step_tokens`` in ``rust/moshi-core/src/asr.rs`` of kyutai-labs/moshi,
which moshi-server's ``/api/asr-streaming`` sends as ``Word``/``EndWord``): the pieces since the last padding or
boundary form a word, sent at the first padding (3) or boundary (0) after them; ``EndWord`` comes at the next
boundary, with that boundary's time, and ends every word sent since the previous one. So pieces separated by
padding are sent as separate words there, and here. (Kyutai's PyTorch example ``stt_from_file_pytorch.py``
instead groups all pieces between two boundaries and splits them at spaces; the server's rule is the one its
clients see.) A word starts at its boundary token, or at its first piece when no boundary came before it
(Kyutai's server then reuses the previous boundary's time). At the end of the stream, and at a finalize (a
mid-stream flush), the open word ends at the end of the audio; no time is ever past ``audio_end``, the end of the audio the client sent (the flush silence
after it is not audio).
"""

from __future__ import annotations

import codecs
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from kyutai_stt.audio.constants import FRAME_RATE
from kyutai_stt.engine.contract import ModelInfo
from kyutai_stt.messages.events import Text, Word, WordEnd

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1 << 16)
def piece_bytes(piece: str) -> bytes:
    """The bytes a sentencepiece piece stands for: ``<0xNN>`` (byte fallback) is one byte, "▁" a space."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes((int(match.group(1), 16),))
    return piece.replace("▁", " ").encode()


def _one_replacement_per_byte(error: UnicodeDecodeError) -> tuple[str, int]:
    """sentencepiece's rule for bytes that are not UTF-8: one U+FFFD per byte (Python's "replace" gives one per
    maximal invalid sequence)."""
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("sentencepiece", _one_replacement_per_byte)


def _utf8_decoder():
    return codecs.getincrementaldecoder("utf-8")(errors="sentencepiece")


@dataclass
class WordAssembler:
    piece: Callable[[int], str]  # token id -> sentencepiece piece
    offset_frames: int  # model delay + silence prefix, in frames
    frame_rate: float = FRAME_RATE
    padding_token: int = 3
    boundary_token: int = 0
    first_piece_token: int = 4
    piece_starts_word: bool = False  # NeMo: a piece that begins with "▁" starts a word (``ModelInfo.word_start``)
    _last_piece: float = 0.0  # time of the latest piece (piece_starts_word: the word's end when the next starts)
    _bytes: bytearray = field(default_factory=bytearray)  # the word being assembled, as its pieces' bytes
    _text: object = field(default_factory=_utf8_decoder)  # its text so far, for the Text events (bytes may split)
    _texted: bool = False  # a Text event of this word was sent
    _start: float | None = None  # start of the word being assembled (or awaiting its pieces)
    _open_word: bool = False  # a Word was sent whose WordEnd is still due
    audio_end: float = math.inf  # seconds of audio the client sent, once known (set at the end of the stream)

    @classmethod
    def for_model(cls, info: ModelInfo) -> "WordAssembler":
        return cls(info.piece, info.lead_frames, info.frame_rate, info.padding_token, info.boundary_token,
                   info.first_piece_token, info.word_start == "piece")

    def time(self, frame: int) -> float:
        """Seconds into the client's audio of a token produced at ``frame`` (0 before it, ``audio_end`` after)."""
        return min(max(0.0, (frame - self.offset_frames) / self.frame_rate), self.audio_end)

    def feed(self, frame: int, token: int) -> list[Text | Word | WordEnd]:
        now = self.time(frame)
        out: list[Text | Word | WordEnd] = []
        if self.piece_starts_word:
            return self._feed_piece_word(frame, token, now)
        if token >= self.first_piece_token:
            return self._add_piece(self.piece(token), now)
        if token not in (self.padding_token, self.boundary_token):
            return out  # bos/eos/unk-like ids carry no text
        out.extend(self._complete())
        if token == self.boundary_token:
            if self._open_word:
                out.append(WordEnd(stop_time=now))
                self._open_word = False
            self._start = now
        return out

    def _feed_piece_word(self, frame: int, token: int, now: float) -> list[Text | Word | WordEnd]:
        """NeMo's convention: padding is no new text; a "▁" piece completes the word before it (ending one frame
        after its last piece) and starts a new one."""
        if token < self.first_piece_token:
            return []
        out: list[Text | Word | WordEnd] = []
        piece = self.piece(token)
        if piece.startswith("▁") and self._bytes:
            out.extend(self._complete())
            if self._open_word:
                out.append(WordEnd(stop_time=min(now, self._last_piece + 1 / self.frame_rate)))
                self._open_word = False
        self._last_piece = now
        return out + self._add_piece(piece, now)

    def _add_piece(self, piece: str, now: float) -> list[Text]:
        """One piece into the word being assembled; its text, once whole characters, as a ``Text``."""
        data = piece_bytes(piece)
        if self._start is None:
            self._start = now
        self._bytes += data
        text = self._text.decode(data)  # "" while a character's bytes are incomplete
        if not text:
            return []
        if not self._texted and not text.startswith(" "):
            text = " " + text
        self._texted = True
        return [Text(text=text, time=now)]

    def _complete(self) -> list[Word]:
        if not self._bytes:
            return []
        text = self._bytes.decode("utf-8", errors="sentencepiece").strip()
        start = self._start if self._start is not None else 0.0
        self._bytes = bytearray()
        self._text = _utf8_decoder()
        self._texted = False
        self._start = None
        if not text:
            return []
        self._open_word = True
        return [Word(text=text, start_time=start)]

    def finish(self, frame: int) -> list[Word | WordEnd]:
        """End of the audio, or a finalize (a flush that does not end the stream): complete the word in progress
        and close it at ``frame`` (times never pass ``audio_end``). What follows starts afresh, as a new stream's
        words would: a finalize gives exactly the words of a stream that ends there."""
        out: list[Word | WordEnd] = list(self._complete())
        if self._open_word:
            out.append(WordEnd(stop_time=self.time(frame)))
            self._open_word = False
        self._start = None  # a boundary seen in the flush silence does not start the next segment's word
        return out


@dataclass(frozen=True)
class TimedWord:
    text: str
    start: float
    end: float


class WordPairer:
    """Joins Word and WordEnd events into words with start and end, as they come (the in-process API) or all at
    once (``pair_words``). A Word with no WordEnd before the next Word ends at that word's start."""

    def __init__(self) -> None:
        self.words: list[TimedWord] = []  # final words
        self.pending: Word | None = None  # a complete word whose end is not known yet

    def feed(self, event: object) -> None:
        if isinstance(event, Word):
            if self.pending is not None:  # no WordEnd between two words: end at the next start
                self.words.append(TimedWord(self.pending.text, self.pending.start_time, event.start_time))
            self.pending = event
        elif isinstance(event, WordEnd) and self.pending is not None:
            self.words.append(TimedWord(self.pending.text, self.pending.start_time,
                                        max(event.stop_time, self.pending.start_time)))
            self.pending = None

    def all_words(self) -> list[TimedWord]:
        """Every word so far; the last complete word has ``end == start`` until its end is known."""
        tail = [TimedWord(self.pending.text, self.pending.start_time, self.pending.start_time)] \
            if self.pending is not None else []
        return self.words + tail


def pair_words(events: Iterable[object]) -> list[TimedWord]:
    """Join Word and WordEnd events into words with start and end (for files and transcript formats)."""
    pairer = WordPairer()
    for event in events:
        pairer.feed(event)
    return pairer.all_words()
