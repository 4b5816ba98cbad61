"""In-process streaming, no server: a context manager fed with audio chunks, words available as they come.

    from kyutai_stt.stream.local import SpeechToText
    stt = SpeechToText.load("kyutai/stt-1b-en_fr-candle")      # or a local checkpoint folder
    with stt.transcribe_stream(sample_rate=16000) as stream:
        for chunk in chunks:
            stream.add_audio(chunk)            # 1-D float array at sample_rate
            print(stream.text, stream.draft)   # final words so far, and the word being recognised
    print(stream.words)                        # every word, final, with start and end times
    stt.close()

Several ``transcribe_stream`` blocks (in threads) share the model's batch, up to ``slots`` at once.
"""

from __future__ import annotations

import threading

import numpy as np

from kyutai_stt.audio.resample import StreamResampler
from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.engine.kyutai.checkpoint import SttModel, load_model
from kyutai_stt.engine.kyutai.engine import Engine, StepOutput, StreamEnd, StreamFailed, default_frames_per_step
from kyutai_stt.messages.events import Text, Word
from kyutai_stt.stream.words import TimedWord, WordAssembler, WordPairer


class StreamFailedError(RuntimeError):
    pass


class LocalStream:
    """One stream. Properties are safe to read from any thread at any time."""

    def __init__(self, engine: Engine, sample_rate: int, timeout: float):
        model = engine.model
        self._engine = engine
        self._timeout = timeout
        self._assembler = WordAssembler(model.tokenizer.id_to_piece, model.delay_frames + model.prefix_frames)
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
                    self._apply(self._assembler.feed(item.frame, item.token))
                elif isinstance(item, StreamEnd):
                    self._apply(self._assembler.finish(item.frames))
                    self._done.set()
                elif isinstance(item, StreamFailed):
                    self._failure = item.reason
                    self._done.set()

    def _apply(self, events) -> None:
        for event in events:
            if isinstance(event, Text):
                self._draft.append(event.text)
            else:
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
                self._assembler.audio_end = self._samples / SAMPLE_RATE
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
    """A model and its engine, in this process."""

    def __init__(self, model: SttModel, slots: int = 4, flush_seconds: float = 0.5, frames_per_step: int = 0):
        self.model = model
        frames = frames_per_step or default_frames_per_step(model.device)
        self.engine = Engine(model, slots, flush_seconds=flush_seconds, frames_per_step=frames).start()

    @classmethod
    def load(cls, model: str, device: str = "auto", dtype: str = "auto", slots: int = 4) -> "SpeechToText":
        return cls(load_model(model, device, dtype), slots)

    def transcribe_stream(self, sample_rate: int = 24000, timeout: float = 600.0) -> LocalStream:
        return LocalStream(self.engine, sample_rate, timeout)

    def close(self) -> None:
        self.engine.stop()

    def __enter__(self) -> "SpeechToText":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
