"""Sample-rate conversion to 24 kHz, whole or as a stream, with one zero-phase kernel (julius): times never move."""

from __future__ import annotations

from math import gcd

import julius
import numpy as np
import torch

from kyutai_stt.audio.constants import SAMPLE_RATE


def resample(pcm: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Exact-length resampling (sphn.resample is not exact in length; julius is)."""
    if from_rate == to_rate or pcm.size == 0:
        return np.asarray(pcm, np.float32)
    out = julius.resample_frac(torch.from_numpy(np.ascontiguousarray(pcm, np.float32)), from_rate, to_rate)
    return out.numpy()


class StreamResampler:
    """Resample a PCM stream chunk by chunk to 24 kHz with the same kernel as ``resample``.

    Input is processed in blocks of whole resampling periods with ``margin`` samples of context on each side,
    so every output sample sees the same neighbourhood it would see in a one-shot resample of the whole stream
    (edges aside). The output lags the input by the margin (under 0.1 s) until ``flush``.
    """

    def __init__(self, from_rate: int, to_rate: int = SAMPLE_RATE):
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
