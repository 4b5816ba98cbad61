"""Audio in: Ogg/Opus streams, audio files, PCM at any rate; everything becomes 24 kHz mono float32."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import julius
import numpy as np
import sphn
import torch

from .checkpoint import FRAME_SIZE, SAMPLE_RATE


class AudioFormatError(ValueError):
    """The bytes are not audio we can decode; the message says why."""


class OggOpusDecoder:
    """Incremental Ogg/Opus decoder: takes bytes in any grouping (headers first), returns 24 kHz mono PCM."""

    def __init__(self) -> None:
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._seen = 0

    def feed(self, data: bytes) -> np.ndarray:
        if self._seen < 4:
            head = data[: 4 - self._seen]
            if head != b"OggS"[self._seen: self._seen + len(head)]:
                raise AudioFormatError("not an Ogg stream (expected Ogg/Opus pages starting with 'OggS')")
        self._seen += len(data)
        try:
            pcm = self._reader.append_bytes(data)
        except Exception as exc:  # sphn raises ValueError/RuntimeError with a decoder message
            raise AudioFormatError(f"invalid Ogg/Opus data: {exc}") from None
        return np.asarray(pcm, dtype=np.float32).reshape(-1)


def resample(pcm: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Exact-length resampling (sphn.resample is not exact in length; julius is)."""
    if from_rate == to_rate or pcm.size == 0:
        return np.asarray(pcm, np.float32)
    out = julius.resample_frac(torch.from_numpy(np.ascontiguousarray(pcm, np.float32)), from_rate, to_rate)
    return out.numpy()


def to_mono(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm, np.float32)
    return pcm.mean(axis=0) if pcm.ndim == 2 else pcm.reshape(-1)


def load_audio_file(path: str | Path) -> np.ndarray:
    """Read wav/mp3/flac/ogg (Vorbis or Opus) into 24 kHz mono float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such audio file: {path}")
    errors = []
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"OggS") and b"OpusHead" in head:
        try:
            pcm, rate = sphn.read_opus(str(path))
            return resample(to_mono(pcm), rate)
        except Exception as exc:
            errors.append(f"opus: {exc}")
    try:
        pcm, rate = sphn.read(str(path), sample_rate=SAMPLE_RATE)
        return to_mono(pcm)
    except Exception as exc:
        errors.append(f"sphn: {exc}")
    try:
        import soundfile

        pcm, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        return resample(to_mono(pcm.T), rate)
    except Exception as exc:
        errors.append(f"soundfile: {exc}")
    raise AudioFormatError(f"could not decode {path.name} as audio ({'; '.join(errors)})")


def load_audio_bytes(data: bytes, suffix: str = "") -> np.ndarray:
    """Decode a whole uploaded file (any format load_audio_file reads)."""
    if not data:
        raise AudioFormatError("empty audio file")
    fd, name = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_audio_file(name)
    finally:
        os.unlink(name)


def encode_ogg_opus(pcm: np.ndarray, frame_samples: int = 1920) -> list[bytes]:
    """Encode 24 kHz mono PCM as the Ogg pages a streaming client sends (headers first)."""
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    pages = []
    for start in range(0, len(pcm), frame_samples):
        chunk = np.zeros(frame_samples, np.float32)
        part = pcm[start:start + frame_samples]
        chunk[: len(part)] = part
        data = writer.append_pcm(chunk)
        if data:
            pages.append(data)
    return pages


class StreamResampler:
    """Resample a PCM stream chunk by chunk to 24 kHz with the same kernel as ``resample``.

    Input is processed in blocks of whole resampling periods with ``margin`` samples of context on each side,
    so every output sample sees the same neighbourhood it would see in a one-shot resample of the whole stream
    (edges aside). The output lags the input by the margin (under 0.1 s) until ``flush``.
    """

    def __init__(self, from_rate: int, to_rate: int = SAMPLE_RATE):
        from math import gcd

        g = gcd(from_rate, to_rate)
        self.old, self.new = from_rate // g, to_rate // g
        self.identity = from_rate == to_rate
        self.from_rate, self.to_rate = from_rate, to_rate
        self.margin = self.old * -(-2048 // self.old)
        self._pending = np.zeros(self.margin, np.float32)  # left context starts as silence
        self._ready_from = self.margin  # index in _pending of the first sample not yet resampled

    def _run(self, block: np.ndarray) -> np.ndarray:
        out = julius.resample_frac(torch.from_numpy(block), self.from_rate, self.to_rate)
        return out.numpy()

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        if self.identity:
            return pcm
        self._pending = np.concatenate([self._pending, pcm])
        available = len(self._pending) - self._ready_from - self.margin  # samples with full right context
        periods = available // self.old
        if periods <= 0:
            return np.zeros(0, np.float32)
        count = periods * self.old
        start = self._ready_from - self.margin
        block = self._pending[start:self._ready_from + count + self.margin]
        out = self._run(block)
        skip = self.margin * self.new // self.old
        result = out[skip:skip + count * self.new // self.old]
        # keep only what the next block needs as left context
        keep_from = self._ready_from + count - self.margin
        self._pending = self._pending[keep_from:]
        self._ready_from = self.margin
        return result

    def flush(self) -> np.ndarray:
        """The rest of the stream (right edge padded with silence)."""
        if self.identity:
            return np.zeros(0, np.float32)
        rest = len(self._pending) - self._ready_from
        if rest <= 0:
            return np.zeros(0, np.float32)
        pad = (-rest) % self.old
        out = self.feed(np.zeros(pad + self.margin, np.float32))
        return out[: round(rest * self.new / self.old)] if len(out) else out


class audio_chunks:
    """Audio as an async iterator of float32 chunks: slices of an array (paced at real time if asked), or the
    chunks of an async iterable as they come. Counts the samples it yielded."""

    def __init__(self, audio, chunk_samples: int = FRAME_SIZE, realtime: bool = False):
        self.audio, self.chunk_samples, self.realtime = audio, chunk_samples, realtime
        self.samples = 0

    async def __aiter__(self):
        if isinstance(self.audio, np.ndarray):
            pcm = np.asarray(self.audio, np.float32).reshape(-1)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for offset in range(0, len(pcm), self.chunk_samples):
                chunk = pcm[offset:offset + self.chunk_samples]
                self.samples += len(chunk)
                yield chunk
                if self.realtime:
                    await asyncio.sleep(max(0.0, start + self.samples / SAMPLE_RATE - loop.time()))
        else:
            async for chunk in self.audio:
                chunk = np.asarray(chunk, np.float32).reshape(-1)
                self.samples += len(chunk)
                yield chunk
