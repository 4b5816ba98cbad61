"""In-process streaming, no server: a context manager fed with audio chunks, words available as they come.

    from kyutai_stt.stream.local import SpeechToText
    stt = SpeechToText.load("kyutai/stt-1b-en_fr-candle")      # or a local checkpoint folder
    with stt.transcribe_stream(sample_rate=16000) as stream:
        for chunk in chunks:
            stream.add_audio(chunk)            # 1-D float array at sample_rate
            print(stream.text, stream.draft)   # final words so far, and the word being recognised
    print(stream.words)                        # every word, final, with start and end times
    stt.close()

Several ``transcribe_stream`` blocks (in threads) share the model's batch, up to ``slots`` at once (default
``Settings().slots``, as the server). Engine outputs become words through the same ``OutputReader`` as a server
session's.
"""

from __future__ import annotations

import threading

import numpy as np

from kyutai_stt.audio.resample import StreamResampler
from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.engine.contract import Engine, StepOutput, StreamEnd, StreamFailed
from kyutai_stt.engine.startup import start_engine
from kyutai_stt.messages.events import Text, Word, WordEnd
from kyutai_stt.settings import Settings
from kyutai_stt.stream.reader import OutputReader
from kyutai_stt.stream.words import TimedWord, WordPairer


class StreamFailedError(RuntimeError):
    pass


class LocalStream:
    """One stream. Properties are safe to read from any thread at any time."""

    def __init__(self, engine: Engine, sample_rate: int, timeout: float):
        self._engine = engine
        self._timeout = timeout
        self._reader = OutputReader(engine.info)
        self._resampler = StreamResampler(sample_rate)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._pairer = WordPairer()  # final words, and the complete word whose end is not known yet
        self._draft: list[str] = []
        self._failure: str | None = None
        self._samples = 0  # 24 kHz samples pushed: the end of the audio (the flush silence after it is not audio)
        self._handle = engine.open(self._sink)

    def _sink(self, events) -> None:  # engine worker thread
        with self._lock:
            for item in events:
                if isinstance(item, StepOutput):
                    self._apply(self._reader.step(item, item.buffered_samples))
                elif isinstance(item, StreamEnd):
                    self._apply(self._reader.end(item))
                    self._done.set()
                elif isinstance(item, StreamFailed):
                    self._failure = item.reason
                    self._done.set()

    def _apply(self, events) -> None:
        for event in events:
            if isinstance(event, Text):
                self._draft.append(event.text)
            elif isinstance(event, (Word, WordEnd)):
                if isinstance(event, Word):
                    self._draft = []
                self._pairer.feed(event)

    def add_audio(self, chunk) -> None:
        if self._done.is_set():
            raise StreamFailedError(self._failure or "the stream is finished")
        pcm = self._resampler.feed(np.asarray(chunk, np.float32).reshape(-1))
        self._samples += pcm.size
        self._engine.push(self._handle, pcm)

    def finish(self) -> list[TimedWord]:
        """No more audio: wait for the last words (the model's delay is flushed) and return every word."""
        if not self._done.is_set():
            tail = self._resampler.flush()
            with self._lock:  # no word time past the audio (as Session does)
                self._samples += tail.size
                self._reader.set_audio_end(self._samples / SAMPLE_RATE)
            self._engine.push(self._handle, tail)
            self._engine.close(self._handle)
        if not self._done.wait(self._timeout):
            self._engine.abort(self._handle)
            raise TimeoutError("the stream did not finish in time")
        if self._failure:
            raise StreamFailedError(self._failure)
        return self.words

    def abort(self) -> None:
        self._engine.abort(self._handle)
        self._done.set()

    @property
    def words(self) -> list[TimedWord]:
        """Final words so far; the last complete word has ``end == start`` until its end is known."""
        with self._lock:
            return self._pairer.all_words()

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    @property
    def draft(self) -> str:
        """The word being recognised (pieces so far); it becomes final once complete."""
        with self._lock:
            return "".join(self._draft).strip()

    def __enter__(self) -> "LocalStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


class SpeechToText:
    """A model and its engine, in this process, started as the server starts it (``start_engine``)."""

    def __init__(self, model=None, settings: Settings | None = None):
        """``model``: already loaded (else the one ``settings`` names, the defaults and ``KYUTAI_STT_*``)."""
        self.settings = settings or Settings()
        self.engine = start_engine(self.settings, model)

    @classmethod
    def load(cls, model: str, device: str = "auto", dtype: str = "auto", **settings) -> "SpeechToText":
        """``settings``: any other ``Settings`` field (``slots``, ``flush_seconds``, ``frames_per_step``...)."""
        return cls(settings=Settings(model=model, device=device, dtype=dtype, **settings))

    def transcribe_stream(self, sample_rate: int = 24000, timeout: float = 600.0) -> LocalStream:
        return LocalStream(self.engine, sample_rate, timeout)

    def close(self) -> None:
        self.engine.stop()

    def __enter__(self) -> "SpeechToText":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
