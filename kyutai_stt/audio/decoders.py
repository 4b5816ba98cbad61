"""One decoder protocol for streamed audio, and one factory: every protocol adapter and the Queue bridge get their
decoder here, by (format, sample rate, channels).

A ``StreamDecoder`` takes bytes in any grouping and gives 24 kHz mono float32:
- ``feed(data)``: the audio decodable so far (possibly empty: a resampler's margin, a partial page or sample
  waits for the rest);
- ``flush()``: what a mid-stream flush can release without ending the stream (a resampler's tail: the stream
  then goes on with a fresh resampler);
- ``end()``: the end of the stream: everything left;
- ``close()``: free what the decoder holds (a container decoder's helper thread), however the stream ended.
Bad bytes raise ``AudioFormatError`` from ``feed`` or ``end``.

Kinds: raw samples (``RawDecoder``: PCM f32/s16 and G.711, interleaved channels mixed down; ``ChannelsDecoder``:
kept apart, ``[channels, samples]``, for multichannel streams), Ogg/Opus
(``decode.OggOpusDecoder``), any container FFmpeg reads (``codecs.ContainerStreamDecoder``), and for the Modal
Queue, Ogg/Opus or a whole file gathered and decoded at the end (``OpusOrFileDecoder``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kyutai_stt.audio.codecs import ContainerStreamDecoder, g711_decode
from kyutai_stt.audio.constants import CONTAINER_FORMATS, SAMPLE_RATE
from kyutai_stt.audio.decode import OggOpusDecoder, load_audio_bytes
from kyutai_stt.audio.errors import AudioFormatError
from kyutai_stt.audio.resample import StreamResampler

RAW_FORMATS = ("pcm_f32le", "pcm_s16le", "mulaw", "alaw")
OPUS = "opus"
OPUS_OR_FILE = "opus_or_file"


class StreamDecoder(Protocol):
    def feed(self, data: bytes) -> np.ndarray: ...

    def flush(self) -> np.ndarray: ...

    def end(self) -> np.ndarray: ...

    def close(self) -> None: ...


_EMPTY = np.zeros(0, np.float32)


class RawDecoder:
    """Raw samples at ``sample_rate`` (``channels`` interleaved) to 24 kHz mono: little-endian float32 or int16
    PCM, or G.711 mu-law / A-law (one byte a sample). A sample split across messages waits for its rest. Stereo is
    mixed down as the mean of the channels, as the Ogg/Opus decoder does. NaN or infinite samples are refused;
    finite float samples beyond [-1, 1] are clipped to it, as a sound card would."""

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE, channels: int = 1):
        if fmt not in RAW_FORMATS:
            raise AudioFormatError(f"unknown raw format {fmt!r}: use one of {', '.join(RAW_FORMATS)}")
        self.fmt, self.sample_rate, self.channels = fmt, sample_rate, channels
        self.width = {"pcm_f32le": 4, "pcm_s16le": 2}.get(fmt, 1) * channels  # bytes per sample of every channel
        self.resampler = StreamResampler(sample_rate)
        self._carry = b""

    def _samples(self, data: bytes) -> np.ndarray:
        if self.fmt == "pcm_f32le":
            pcm = np.frombuffer(data, "<f4").astype(np.float32)
            if not np.all(np.isfinite(pcm)):
                raise AudioFormatError("PCM contains NaN or infinite samples")
            return pcm
        if self.fmt == "pcm_s16le":
            return np.frombuffer(data, "<i2").astype(np.float32) * (1 / 32768)
        return g711_decode(data, self.fmt)

    def feed(self, data: bytes) -> np.ndarray:
        data = self._carry + bytes(data) if self._carry else bytes(data)
        usable = len(data) - len(data) % self.width
        self._carry = data[usable:]
        pcm = self._samples(data[:usable])
        if self.channels > 1:
            pcm = pcm.reshape(-1, self.channels).mean(axis=1)
        return self.resampler.feed(np.clip(pcm, -1.0, 1.0))  # a no-op but for float PCM

    def flush(self) -> np.ndarray:
        """The audio the resampler still holds; a fresh resampler takes the rest of the stream."""
        out = self.resampler.flush()
        self.resampler = StreamResampler(self.sample_rate)
        return out

    def end(self) -> np.ndarray:
        return self.resampler.flush()

    def close(self) -> None:
        pass


class ChannelsDecoder:
    """Raw interleaved samples kept apart: ``channels`` rows of 24 kHz float32 (shape ``[channels, samples]``), each
    channel decoded exactly as a mono stream of it would be (one ``RawDecoder`` per channel, so a channel's audio
    does not depend on the others). For multichannel streams, whose channels are transcribed one by one."""

    def __init__(self, fmt: str, sample_rate: int, channels: int):
        self.channels = channels
        self.width = RawDecoder(fmt, sample_rate).width  # bytes per sample of one channel
        self._decoders = [RawDecoder(fmt, sample_rate) for _ in range(channels)]
        self._carry = b""

    def _rows(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.stack(parts) if parts else np.zeros((self.channels, 0), np.float32)

    def feed(self, data: bytes) -> np.ndarray:
        data = self._carry + bytes(data) if self._carry else bytes(data)
        frame = self.width * self.channels
        usable = len(data) - len(data) % frame
        self._carry = data[usable:]
        samples = np.frombuffer(data[:usable], np.uint8).reshape(-1, self.channels, self.width)
        return self._rows([d.feed(samples[:, c].tobytes()) for c, d in enumerate(self._decoders)])

    def flush(self) -> np.ndarray:
        return self._rows([d.flush() for d in self._decoders])

    def end(self) -> np.ndarray:
        return self._rows([d.end() for d in self._decoders])

    def close(self) -> None:
        pass


class OpusOrFileDecoder:
    """Ogg/Opus pages decoded as they come, or pieces of any other audio file (wav, mp3, flac, Ogg/Vorbis...)
    gathered up to ``max_bytes`` and decoded at the end: the Modal Queue's chunks, whose format nobody declares.
    ``end`` then decodes the whole file: call it off the event loop."""

    _OPUS_HEAD_AT = 28  # "OggS" page header (27 bytes) + a one-entry segment table, then "OpusHead"

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._head = b""  # the first bytes, until they tell Ogg/Opus from a file
        self._opus: OggOpusDecoder | None = None
        self._file: bytearray | None = None

    def feed(self, data: bytes) -> np.ndarray:
        if self._opus is None and self._file is None:
            self._head += data
            if b"OggS".startswith(self._head[:4]) and len(self._head) < self._OPUS_HEAD_AT + 8:
                return _EMPTY  # too early to tell an Ogg/Opus stream from an Ogg/Vorbis file
            data, self._head = self._head, b""
            if data[self._OPUS_HEAD_AT:self._OPUS_HEAD_AT + 8] == b"OpusHead":
                self._opus = OggOpusDecoder()
            else:
                self._file = bytearray()
        if self._opus is not None:
            return self._opus.feed(data)
        self._file += data
        if len(self._file) > self.max_bytes:
            raise AudioFormatError(f"encoded audio larger than {self.max_bytes} bytes: stream Ogg/Opus instead")
        return _EMPTY

    def flush(self) -> np.ndarray:
        return _EMPTY

    def end(self) -> np.ndarray:
        if self._file is None and self._head:
            self._file = bytearray(self._head)
        if not self._file:
            return _EMPTY
        data, self._file = bytes(self._file), bytearray()
        return load_audio_bytes(data)

    def close(self) -> None:
        pass


def stream_decoder(fmt: str, sample_rate: int = SAMPLE_RATE, channels: int = 1,
                   max_bytes: int | None = None, split_channels: bool = False) -> StreamDecoder:
    """The decoder for ``fmt``: ``"opus"`` (Ogg/Opus pages), a raw format of ``RAW_FORMATS`` at ``sample_rate``
    with ``channels`` interleaved (mixed down, or kept apart with ``split_channels``: ``ChannelsDecoder``), a key
    of ``CONTAINER_FORMATS`` (``"container"``: FFmpeg probes), or ``"opus_or_file"`` (files gathered up to
    ``max_bytes``). Raises ``AudioFormatError`` for anything else."""
    if split_channels:
        if fmt not in RAW_FORMATS:
            raise AudioFormatError("separate channels need raw audio (PCM or G.711)")
        return ChannelsDecoder(fmt, sample_rate, channels)
    if fmt == OPUS:
        return OggOpusDecoder()
    if fmt in RAW_FORMATS:
        return RawDecoder(fmt, sample_rate, channels)
    if fmt == OPUS_OR_FILE:
        return OpusOrFileDecoder(max_bytes if max_bytes is not None else 1 << 30)
    if fmt in CONTAINER_FORMATS:
        return ContainerStreamDecoder(fmt)
    raise AudioFormatError(f"unknown audio format {fmt!r}")
