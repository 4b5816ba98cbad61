"""Codecs and containers beyond Ogg/Opus: G.711 telephony audio and any container FFmpeg reads (through PyAV).

- ``g711_decode``: raw G.711 mu-law / A-law bytes (8 kHz telephony, one byte per sample) to float samples.
- ``ContainerStreamDecoder``: an audio container (WebM/Opus as a browser's MediaRecorder records it, Ogg, mp3,
  ADTS AAC, FLAC, WAV...) pushed in pieces as it arrives, decoded to 24 kHz mono float32.
- ``decode_container``: a whole file (also m4a/mp4, whose index may sit at the end) to 24 kHz mono float32.

Channels are mixed down as their mean ((L + R) / 2 for stereo). Rates are converted by ``audio.resample`` (a
zero-phase kernel: no time shift). Errors are ``audio.errors.AudioFormatError`` with a message naming the
problem only: never a server path or a library's internals. The streaming decoders of every kind are made by
``audio.decoders.stream_decoder``.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Literal

import av
import numpy as np

from kyutai_stt.audio.constants import CONTAINER_FORMATS
from kyutai_stt.audio.errors import MIN_FILE_SAMPLE_RATE, AudioFormatError, AudioTooLong
from kyutai_stt.audio.resample import StreamResampler, resample

__all__ = ["g711_decode", "ContainerStreamDecoder", "decode_container", "probe_duration"]


def _mulaw_table() -> np.ndarray:
    """ITU-T G.711 mu-law expansion of all 256 codes to 16-bit linear values (+-32124)."""
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (code >> 4) & 0x07
    magnitude = (((code & 0x0F) << 3) + 0x84) << exponent
    return np.where(code & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.float32) / 32768.0


def _alaw_table() -> np.ndarray:
    """ITU-T G.711 A-law expansion of all 256 codes to 16-bit linear values (+-32256)."""
    code = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (code & 0x70) >> 4
    value = ((code & 0x0F) << 4) + 8
    value = np.where(segment >= 1, (value + 0x100) << np.maximum(segment - 1, 0), value)
    return np.where(code & 0x80, value, -value).astype(np.float32) / 32768.0


_G711 = {"mulaw": _mulaw_table(), "alaw": _alaw_table()}


def g711_decode(data: bytes, law: Literal["mulaw", "alaw"]) -> np.ndarray:
    """G.711 bytes (one per sample, any grouping) to float32 mono in [-1, 1], at the input's rate (8 kHz in
    telephony). Raises ``ValueError`` for an unknown law."""
    try:
        table = _G711[law]
    except KeyError:
        raise ValueError(f"unknown G.711 law {law!r}: use 'mulaw' or 'alaw'") from None
    return table[np.frombuffer(data, np.uint8)]


def _to_mono(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame as float32 mono: the mean of its channels, whatever the sample format."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:  # packed: (1, samples * channels), interleaved
        data = data.reshape(-1, channels).T
    kind = data.dtype
    data = data.astype(np.float32)
    if kind == np.int16:
        data /= 32768.0
    elif kind == np.int32:
        data /= 2147483648.0
    elif kind == np.uint8:
        data = (data - 128.0) / 128.0
    return data.mean(axis=0) if data.shape[0] > 1 else data[0]


def _describe(exc: BaseException) -> str:
    """FFmpeg's own words for a failure (e.g. 'Invalid data found when processing input'), never its file name."""
    if isinstance(exc, av.FFmpegError):
        return exc.strerror or "invalid data"
    return type(exc).__name__


class _Feed:
    """The file object FFmpeg reads from (no ``seek``: a non-seekable stream). ``read`` blocks the decoding
    thread until bytes arrive or the stream ends, and says when it is waiting, so ``feed`` knows all its bytes
    were consumed."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.chunks: deque[bytes] = deque()
        self.eof = False
        self.waiting = False

    def read(self, size: int = -1) -> bytes:
        with self.cond:
            while not self.chunks and not self.eof:
                self.waiting = True
                self.cond.notify_all()
                self.cond.wait()
            self.waiting = False
            if not self.chunks:
                return b""
            chunk = self.chunks.popleft()
            if 0 < size < len(chunk):
                chunk, rest = chunk[:size], chunk[size:]
                self.chunks.appendleft(rest)
            return chunk


class ContainerStreamDecoder:
    """Audio container bytes pushed in pieces (WebM/Opus, Ogg, mp3, ADTS AAC, FLAC, WAV) to 24 kHz mono float32.

    ``container_format``: a key of ``CONTAINER_FORMATS`` ("webm", "ogg", "mp3"...) or None to let FFmpeg probe.
    FFmpeg demuxes and decodes on a helper thread that reads the pushed bytes as a non-seekable stream; ``feed``
    returns the audio decodable so far (possibly empty: a container's header, or an incomplete packet, waits
    for more). ``end`` ends the stream and returns the rest. Bad data raises ``AudioFormatError`` from
    ``feed`` or ``end``. Formats whose index sits at the end (mp4/m4a) cannot be streamed: upload them.
    Output lags input by the resampler's margin (under 0.1 s) until ``end``, and keeps exact times.
    """

    def __init__(self, container_format: str | None = None):
        if container_format is not None and container_format not in CONTAINER_FORMATS:
            raise AudioFormatError(f"unknown container {container_format!r}: use one of {', '.join(CONTAINER_FORMATS)}")
        self._name = container_format if CONTAINER_FORMATS.get(container_format or "") else "an audio container"
        self._format = CONTAINER_FORMATS.get(container_format) if container_format else None
        self._feed = _Feed()
        self._out: list[np.ndarray] = []  # mono float32 at the stream's own rate, not yet resampled
        self._rate: int | None = None
        self._resampler: StreamResampler | None = None
        self._error: AudioFormatError | None = None
        self._done = False
        self._thread: threading.Thread | None = None

    def feed(self, data: bytes) -> np.ndarray:
        if data:
            with self._feed.cond:
                self._feed.chunks.append(bytes(data))
                self._feed.cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="container-decoder", daemon=True)
                self._thread.start()
        return self._collect(final=False)

    def flush(self) -> np.ndarray:
        """Mid-stream flush: nothing more to give. FFmpeg cannot be flushed without ending the stream; the
        audio decoded so far has already come out of ``feed`` (less the resampler's margin, under 0.1 s)."""
        return np.zeros(0, np.float32)

    def end(self) -> np.ndarray:
        """No more bytes: decode what is left and flush the resampler."""
        self.close()
        out = self._collect(final=True)
        if self._resampler is not None:
            out = np.concatenate([out, self._resampler.flush()])
        return out

    def close(self) -> None:
        """Stop the helper thread (at end of stream, or when the client is gone)."""
        with self._feed.cond:
            self._feed.eof = True
            self._feed.cond.notify_all()

    def _collect(self, final: bool) -> np.ndarray:
        feed = self._feed
        with feed.cond:
            if self._thread is not None:
                feed.cond.wait_for(lambda: self._done or (feed.waiting and not feed.chunks and not final))
            pieces, self._out = self._out, []
            error = self._error
        out = [self._resampled(rate, pcm) for rate, pcm in pieces]
        if error is not None:
            raise error
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _resampled(self, rate: int, pcm: np.ndarray) -> np.ndarray:
        flushed = np.zeros(0, np.float32)
        if rate != self._rate:  # first audio, or a chained stream at another rate
            if self._resampler is not None:
                flushed = self._resampler.flush()
            self._rate, self._resampler = rate, StreamResampler(rate)
        return np.concatenate([flushed, self._resampler.feed(pcm)])

    def _run(self) -> None:
        try:
            with av.open(self._feed, mode="r", format=self._format) as container:
                if not container.streams.audio:
                    raise AudioFormatError("the container holds no audio stream")
                for frame in container.decode(container.streams.audio[0]):
                    pcm = _to_mono(frame)
                    with self._feed.cond:
                        self._out.append((frame.sample_rate, pcm))
        except AudioFormatError as exc:
            self._error = exc
        except Exception as exc:  # FFmpeg's errors (bad data, unknown codec...), and PyAV's own
            self._error = AudioFormatError(f"could not decode the stream as {self._name}: {_describe(exc)}")
        finally:
            with self._feed.cond:
                self._done = True
                self._feed.cond.notify_all()


def probe_duration(path: str) -> float | None:
    """Seconds of audio the file's header announces, without decoding; None when it does not say (or is not a
    container FFmpeg reads: decoding then reports why). Raises ``AudioFormatError`` for a rate under 8 kHz."""
    try:
        with av.open(path, mode="r") as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            rate = stream.sample_rate or stream.codec_context.sample_rate
            if rate and rate < MIN_FILE_SAMPLE_RATE:
                raise AudioFormatError(f"unsupported sample rate {rate} Hz (at least {MIN_FILE_SAMPLE_RATE} Hz)")
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return container.duration / 1e6 if container.duration else None
    except AudioFormatError:
        raise
    except Exception:
        return None


def decode_container(path: str, max_seconds: float | None = None) -> np.ndarray:
    """A whole audio file (any container and codec FFmpeg reads: wav, mp3, flac, ogg, webm, m4a/AAC...) to 24 kHz
    mono float32, times unchanged. Raises ``AudioFormatError`` when it holds no decodable audio, or more than
    ``max_seconds`` of it (``audio.AudioTooLong``)."""
    try:
        with av.open(path, mode="r") as container:
            if not container.streams.audio:
                raise AudioFormatError("the file holds no audio stream")
            stream = container.streams.audio[0]
            rate = stream.sample_rate or stream.codec_context.sample_rate
            if rate and rate < MIN_FILE_SAMPLE_RATE:
                raise AudioFormatError(f"unsupported sample rate {rate} Hz (at least {MIN_FILE_SAMPLE_RATE} Hz)")
            pieces: list[np.ndarray] = []
            samples = 0
            for frame in container.decode(stream):
                if frame.sample_rate != rate:
                    raise AudioFormatError("the sample rate changes inside the file")
                pieces.append(_to_mono(frame))
                samples += frame.samples
                if max_seconds is not None and samples > max_seconds * rate:
                    raise AudioTooLong(f"audio longer than the {max_seconds:g} s limit (more than {max_seconds:.0f} s)")
    except AudioFormatError:
        raise
    except Exception as exc:
        raise AudioFormatError(f"could not decode the file as audio: {_describe(exc)}") from None
    if not pieces:
        raise AudioFormatError("could not decode the file as audio: it holds no audio samples")
    return resample(np.concatenate(pieces), rate)
