"""Audio in: Ogg/Opus streams, audio files, PCM at any rate; everything becomes 24 kHz mono float32."""

from __future__ import annotations

import asyncio
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path

import julius
import numpy as np
import sphn
import torch

from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE


class AudioFormatError(ValueError):
    """The bytes are not audio we can decode; the message says why."""


_OGG_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, sequence, crc, segments
_BIT_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))
_OTHER_CODECS = ((b"\x01vorbis", "Vorbis"), (b"\x7fFLAC", "FLAC"), (b"Speex   ", "Speex"), (b"\x80theora", "Theora"),
                 (b"PCM     ", "PCM"), (b"fishead\x00", "Skeleton"))


def ogg_crc(page: bytes) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, not reflected, checksum field zeroed).

    zlib's CRC-32 is the reflected form of the same polynomial: run it over bit-reversed bytes with the
    initial and final inversions undone, and bit-reverse the result (C speed, no Python loop over bytes)."""
    page = page[:22] + b"\0\0\0\0" + page[26:]
    raw = zlib.crc32(page.translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{raw:032b}"[::-1], 2)


class OggOpusDecoder:
    """Incremental Ogg/Opus decoder: takes bytes in any grouping (headers first), returns 24 kHz mono PCM.

    The bytes are framed into Ogg pages here and each page is checked before libopus (through sphn) sees it,
    so bad input fails with a clear ``AudioFormatError`` instead of being decoded as noise:
    - not Ogg at all, a page that does not start where the previous one ended, an unknown Ogg version;
    - a page whose checksum does not match (corrupted bytes);
    - an Ogg stream carrying another codec (Vorbis, FLAC, Speex...): the first page names its codec;
    - Opus with more than two channels (channel mapping family other than 0).
    Stereo Opus is decoded to mono by libopus, as the average of the two channels ((L + R) / 2).
    Chained streams (a new Opus stream starting after the previous one, as an encoder restart produces) are
    decoded one after the other; interleaved (multiplexed) streams are refused. Incomplete pages are held
    until the rest arrives (at most one page, under 64 KiB); a page left incomplete at the end is dropped.
    """

    MAX_CHANNELS = 2
    PAGES_PER_CALL = 8

    def __init__(self) -> None:
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._buffer = b""
        self._pages = 0
        self._serial: int | None = None  # the logical stream being decoded

    def feed(self, data: bytes) -> np.ndarray:
        buffer = self._buffer + bytes(data) if self._buffer else bytes(data)
        position, pages, out = 0, [], []
        try:
            while (end := self._next_page(buffer, position)) is not None:
                page = buffer[position:end]
                position = end
                if self._starts_new_stream(page):
                    out.append(self._decode(pages))
                    pages = []
                    self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
                pages.append(page)
        finally:
            self._buffer = buffer[position:]  # at most one incomplete page
        out.append(self._decode(pages))
        return out[-1] if len(out) == 1 else np.concatenate(out)

    def _decode(self, pages: list[bytes]) -> np.ndarray:
        out = []
        # sphn decodes one call into a buffer of about 5 s: hand it a few pages at a time
        for start in range(0, len(pages), self.PAGES_PER_CALL):
            try:
                pcm = self._reader.append_bytes(b"".join(pages[start:start + self.PAGES_PER_CALL]))
            except BaseException as exc:  # sphn raises ValueError/RuntimeError with a decoder message
                if not _decoder_failed(exc):
                    raise
                raise AudioFormatError(f"invalid Ogg/Opus data: {exc}") from None
            out.append(np.asarray(pcm, dtype=np.float32).reshape(-1))
        if not out:
            return np.zeros(0, np.float32)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _next_page(self, buffer: bytes, position: int) -> int | None:
        """End offset of the complete, checked page at ``position``; None when it is not all there yet."""
        where = "the stream" if self._pages == 0 else f"page {self._pages + 1}"
        head = buffer[position:position + 4]
        if head != b"OggS"[: len(head)]:
            if self._pages == 0:
                raise AudioFormatError("not an Ogg stream (expected Ogg/Opus pages starting with 'OggS')")
            raise AudioFormatError(f"corrupt Ogg data: {where} does not start with 'OggS'")
        if len(buffer) - position < _OGG_HEADER.size:
            return None
        _, version, _, _, _, _, checksum, segments = _OGG_HEADER.unpack_from(buffer, position)
        if version != 0:
            raise AudioFormatError(f"corrupt Ogg data: {where} has unknown Ogg version {version}")
        body = position + _OGG_HEADER.size
        if len(buffer) < body + segments:
            return None
        end = body + segments + sum(buffer[body:body + segments])
        if len(buffer) < end:
            return None
        if ogg_crc(buffer[position:end]) != checksum:
            raise AudioFormatError(f"corrupt Ogg data: {where} fails its checksum")
        self._pages += 1
        return end

    def _starts_new_stream(self, page: bytes) -> bool:
        """Check a page's logical stream; True when it begins a chained stream (after the first one)."""
        _, _, flags, _, serial, _, _, segments = _OGG_HEADER.unpack_from(page)
        if not flags & 2:  # not a beginning-of-stream page: it must continue the current stream
            if self._serial is None:
                raise AudioFormatError("the Ogg stream does not start with its header page (OpusHead)")
            if serial != self._serial:
                raise AudioFormatError("interleaved (multiplexed) Ogg streams are not supported")
            return False
        self._check_opus_head(page[_OGG_HEADER.size + segments:])
        chained = self._serial is not None  # (encoders may reuse the serial number: sphn's is always 42)
        self._serial = serial
        return chained

    def _check_opus_head(self, payload: bytes) -> None:
        if not payload.startswith(b"OpusHead"):
            for magic, codec in _OTHER_CODECS:
                if payload.startswith(magic):
                    raise AudioFormatError(f"the Ogg stream carries {codec}, not Opus: send Ogg/Opus")
            raise AudioFormatError("the Ogg stream does not carry Opus (no OpusHead): send Ogg/Opus")
        if len(payload) < 19:
            raise AudioFormatError("invalid OpusHead (too short)")
        version, channels, mapping = payload[8], payload[9], payload[18]
        if version >> 4:
            raise AudioFormatError(f"unsupported Opus header version {version}")
        if channels == 0 or channels > self.MAX_CHANNELS or mapping != 0:
            raise AudioFormatError(f"Opus with {channels} channels (mapping family {mapping}) is not supported: "
                                   "send mono or stereo")


def resample(pcm: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Exact-length resampling (sphn.resample is not exact in length; julius is)."""
    if from_rate == to_rate or pcm.size == 0:
        return np.asarray(pcm, np.float32)
    out = julius.resample_frac(torch.from_numpy(np.ascontiguousarray(pcm, np.float32)), from_rate, to_rate)
    return out.numpy()


class AudioTooLong(AudioFormatError):
    """The file holds more audio than the configured limit."""


MIN_FILE_SAMPLE_RATE = 8000  # a tiny rate in a small file would expand into hours of audio


def _decoder_failed(exc: BaseException) -> bool:
    """True for a decoder's own failure, including a panic in sphn's Rust decoders, which pyo3 raises as
    ``PanicException``, a BaseException (seen with a WAV header declaring a 0 Hz sample rate)."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def load_audio_file(path: str | Path, max_seconds: float | None = None, label: str | None = None) -> np.ndarray:
    """Read any audio file FFmpeg reads (wav, mp3, flac, ogg Vorbis/Opus, WebM/Opus, m4a/AAC...) into 24 kHz mono
    float32, through PyAV (``codecs.decode_container``): channels mixed as their mean, the rate converted with a
    zero-phase kernel, so times are unchanged whatever the file's rate.

    Refuses (``AudioFormatError``) sample rates under 8 kHz and, with ``max_seconds``, files holding more audio
    than that (``AudioTooLong``), checked from the header before decoding when the header says, and while
    decoding. Messages name neither server paths nor library internals.
    """
    from kyutai_stt.audio.codecs import decode_container, probe_duration

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such audio file: {path}")
    if max_seconds is not None:
        duration = probe_duration(str(path))
        if duration is not None and duration > max_seconds:
            raise AudioTooLong(f"audio longer than the {max_seconds:g} s limit ({duration:.0f} s)")
    pcm = decode_container(str(path), max_seconds)
    if max_seconds is not None and len(pcm) > max_seconds * SAMPLE_RATE:
        raise AudioTooLong(f"audio longer than the {max_seconds:g} s limit ({len(pcm) / SAMPLE_RATE:.0f} s)")
    return pcm


def load_audio_bytes(data: bytes, suffix: str = "", max_seconds: float | None = None) -> np.ndarray:
    """Decode a whole uploaded file (any format load_audio_file reads). ``suffix`` (a file name's extension,
    a hint for the decoders) is ignored unless it looks like one."""
    if not data:
        raise AudioFormatError("empty audio file")
    if not re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix or ""):
        suffix = ""
    fd, name = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_audio_file(name, max_seconds, label="the file")
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
