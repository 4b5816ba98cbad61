"""NeMo's own single-stream result for a stream, the reference the batched engine must equal.

NeMo's cache-aware streaming loop at batch 1 (``CacheAwareStreamingAudioBuffer`` with ``pad_and_drop_preencoded``,
as NeMo's ``speech_to_text_cache_aware_streaming_infer.py`` runs it, ``conformer_stream_step`` per chunk), over the
stream's audio resampled to 16 kHz and padded with silence to whole chunks plus the look-ahead, as the engine pads a
stream's last chunk. Returns the greedy CTC label of every 80 ms frame of the stream.
"""

from __future__ import annotations

import numpy as np
import torch

from kyutai_stt.engine.nemo.checkpoint import NemoModel
from kyutai_stt.engine.nemo.features import FRAME_24K, LOOKAHEAD_24K, resample_stream


@torch.no_grad()
def reference_labels(model: NemoModel, pcm24: np.ndarray) -> list[int]:
    from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

    asr = model.asr
    chunk = model.lookahead + 1
    frames = -(-len(pcm24) // FRAME_24K)
    padded = np.zeros(-(-frames // chunk) * chunk * FRAME_24K + LOOKAHEAD_24K, np.float32)
    padded[:len(pcm24)] = pcm24
    pcm16 = resample_stream(torch.from_numpy(padded)).numpy()
    buffer = CacheAwareStreamingAudioBuffer(asr, pad_and_drop_preencoded=True)
    buffer.append_audio(pcm16)
    channel, time_, channel_len = asr.encoder.get_initial_cache_state(batch_size=1, device=model.device)
    labels: list[int] = []
    for features, lengths in buffer:
        out = asr.conformer_stream_step(
            processed_signal=features.to(model.device), processed_signal_length=lengths.to(model.device),
            cache_last_channel=channel, cache_last_time=time_, cache_last_channel_len=channel_len,
            keep_all_outputs=True, drop_extra_pre_encoded=asr.encoder.streaming_cfg.drop_extra_pre_encoded,
            return_transcription=False)
        greedy, _, channel, time_, channel_len, _ = out
        labels.extend(greedy[0].tolist())
        if len(labels) >= frames:
            break
    return labels[:frames]


@torch.no_grad()
def reference_tokens(model: NemoModel, pcm24: np.ndarray) -> list[list[int]]:
    """Per 80 ms frame of the stream, the contract's tokens NeMo's batch-1 streaming loop emits there (CTC: a label
    that is not blank and not a repeat; RNNT/TDT: the hypothesis' tokens stamped with that frame), NeMo ids + 2."""
    from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

    asr = model.asr
    frames = -(-len(pcm24) // FRAME_24K)
    if not hasattr(asr, "joint"):
        blank, previous, out = asr.tokenizer.vocab_size, asr.tokenizer.vocab_size, []
        for label in reference_labels(model, pcm24):
            out.append([] if label in (blank, previous) else [label + 2])
            previous = label
        return out
    chunk = model.lookahead + 1
    padded = np.zeros(-(-frames // chunk) * chunk * FRAME_24K + LOOKAHEAD_24K, np.float32)
    padded[:len(pcm24)] = pcm24
    buffer = CacheAwareStreamingAudioBuffer(asr, pad_and_drop_preencoded=True)
    buffer.append_audio(resample_stream(torch.from_numpy(padded)).numpy())
    channel, time_, channel_len = asr.encoder.get_initial_cache_state(batch_size=1, device=model.device)
    hypotheses = None
    for step, (features, lengths) in enumerate(buffer):
        if step * chunk >= frames:
            break
        out = asr.conformer_stream_step(
            processed_signal=features.to(model.device), processed_signal_length=lengths.to(model.device),
            cache_last_channel=channel, cache_last_time=time_, cache_last_channel_len=channel_len,
            keep_all_outputs=True, previous_hypotheses=hypotheses,
            drop_extra_pre_encoded=asr.encoder.streaming_cfg.drop_extra_pre_encoded, return_transcription=True)
        _, _, channel, time_, channel_len, hypotheses = out
    per_frame: list[list[int]] = [[] for _ in range(frames)]
    if hypotheses:
        hyp = hypotheses[0]
        tokens = hyp.y_sequence.tolist() if torch.is_tensor(hyp.y_sequence) else list(hyp.y_sequence)
        stamps = hyp.timestamp.tolist() if torch.is_tensor(hyp.timestamp) else list(hyp.timestamp)
        for token, stamp in zip(tokens, stamps):
            if stamp < frames:
                per_frame[int(stamp)].append(int(token) + 2)
    return per_frame
