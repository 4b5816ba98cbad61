"""A stream's 24 kHz audio to NeMo's 16 kHz log-mel features, one chunk of frames at a time, as NeMo computes them
for the whole utterance.

The server's pipeline is 24 kHz with 80 ms frames (1920 samples); NeMo's models take 16 kHz audio with 10 ms feature
frames, 8 per 80 ms encoder frame (1280 samples). So the contract's frame ``f`` is exactly encoder frame ``f``.
Each chunk of ``C`` frames is resampled with julius (the kernel of ``audio.resample``, 3:2) and then run through the
model's own preprocessor (pre-emphasis, STFT, mel, log) on a window that has all the left context and look-ahead
its samples and feature frames need, so every feature frame equals the one NeMo computes over the whole utterance
(to rounding: the same sums over other window offsets). The look-ahead is ``LOOKAHEAD_24K`` samples (8 ms): the
STFT window reaches 6 ms into the next frame, and the resampler's kernel 1.6 ms more. The left context comes from the
stream's previous chunk; a stream starts from silence.

Every step runs the same shapes for every slot (the whole batch), so a slot's features never depend on its
neighbours.
"""

from __future__ import annotations

import julius
import torch

RATE_IN, RATE_OUT = 24000, 16000
FRAME_24K, FRAME_16K = 1920, 1280  # 80 ms
HOP = 160  # 10 ms feature frames
FEATURES_PER_FRAME = FRAME_16K // HOP  # 8
RESAMPLE_CONTEXT_24K = 48  # > julius' kernel half-width for 3:2 (39 samples), a multiple of 3
STFT_LOOKAHEAD_16K = 96  # n_fft / 2 - HOP: the last feature frame's window end past its chunk (center=True)
STFT_CONTEXT_16K = 2 * HOP  # two feature frames of left context: the window start (n_fft / 2) and pre-emphasis
LOOKAHEAD_24K = STFT_LOOKAHEAD_16K * 3 // 2 + RESAMPLE_CONTEXT_24K  # 192 samples past the chunk's last frame


class FeatureBatch:
    """Per-slot left context (24 kHz samples, 16 kHz samples, feature frames for the pre-encoder's cache)."""

    def __init__(self, preprocessor: torch.nn.Module, slots: int, features: int, pre_encode_cache: int,
                 device: torch.device | str = "cpu"):
        self.preprocessor = preprocessor  # on ``device``, with the model
        self.tail24 = torch.zeros(slots, RESAMPLE_CONTEXT_24K, device=device)
        self.tail16 = torch.zeros(slots, STFT_CONTEXT_16K, device=device)
        self.cache = torch.zeros(slots, features, pre_encode_cache, device=device)

    def reset(self, mask: torch.Tensor) -> None:
        """Streams start from silence."""
        for tensor in (self.tail24, self.tail16, self.cache):
            tensor[mask] = 0

    @torch.no_grad()
    def chunk(self, pcm: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Features ``[B, features, pre_encode_cache + 8 C]`` for ``pcm`` ``[B, C * 1920 + LOOKAHEAD_24K]`` (the
        chunk and its look-ahead); the context of the ``active`` rows moves past the chunk, the others' stays."""
        frames = (pcm.shape[1] - LOOKAHEAD_24K) // FRAME_24K
        window = torch.cat([self.tail24, pcm], dim=1)
        pcm16 = julius.resample_frac(window, RATE_IN, RATE_OUT)
        skip = RESAMPLE_CONTEXT_24K * 2 // 3
        pcm16 = pcm16[:, skip:skip + frames * FRAME_16K + STFT_LOOKAHEAD_16K]
        signal = torch.cat([self.tail16, pcm16], dim=1)
        lengths = torch.full((signal.shape[0],), signal.shape[1], dtype=torch.long, device=signal.device)
        mel, _ = self.preprocessor(input_signal=signal, length=lengths)
        start = STFT_CONTEXT_16K // HOP
        mel = mel[:, :, start:start + frames * FEATURES_PER_FRAME]
        out = torch.cat([self.cache, mel], dim=2)
        keep = active[:, None]
        consumed = frames * FRAME_24K
        self.tail24 = torch.where(keep, window[:, consumed:consumed + RESAMPLE_CONTEXT_24K], self.tail24)
        end16 = frames * FRAME_16K
        self.tail16 = torch.where(keep, signal[:, end16:end16 + STFT_CONTEXT_16K], self.tail16)
        cache = self.cache.shape[2]
        if cache:
            self.cache = torch.where(keep[:, :, None], out[:, :, -cache:], self.cache)
        return out


def resample_stream(pcm24: torch.Tensor) -> torch.Tensor:
    """A whole stream at 16 kHz, resampled as the engine does (silence before it, ``pcm24`` already padded with the
    look-ahead's silence at its end): the reference's input."""
    window = torch.cat([torch.zeros(RESAMPLE_CONTEXT_24K), pcm24])
    out = julius.resample_frac(window, RATE_IN, RATE_OUT)
    skip = RESAMPLE_CONTEXT_24K * 2 // 3
    return out[skip:]
