"""The single-stream reference: a plain moshi loop at batch 1, no masks, no engine (greedy unless given options).

Every stream the engine serves must get exactly these outputs for the same audio; tests and the soak check it.
It follows the engine's documented conventions (see ``engine``): the first frame is stepped twice (as
``moshi.run_inference`` does), a partial last frame is zero-padded and the flush silence is appended. Mimi's
encoder attention keeps its whole context (``attention_cache``), so its codes do not depend on call sizes in
exact arithmetic; in floating point they do, in the last bits, and now and then a code is a near tie that flips (1 of
36 espeak-ng clips on a CPU, 2 vs 1 frames per call). So the reference encodes as many frames per Mimi call as the
engine steps (``frames_per_step``, aligned to the stream's start), with the engine's attention caches: then the
arithmetic is the engine's (which, where it steps several times ``frames_per_step`` frames at once, is the same:
``engine.default_max_frames_per_step``).
It needs its own model instance: moshi keeps streaming state on the modules themselves. It runs in the same
batch-invariant mode as the engine (``batch_invariant``), so "exact" means the same thing on every device.
Sampling and keyterms go through the same LMGen hooks as in the engine (``decoding``), with one row.
"""

from __future__ import annotations

import numpy as np
import torch

from moshi.models import LMGen

from kyutai_stt.engine import batch_invariant
from kyutai_stt.engine.kyutai.attention_cache import fit_encoder_attention
from kyutai_stt.audio.constants import FRAME_SIZE
from kyutai_stt.engine.contract import DecodingOptions
from kyutai_stt.engine.kyutai.checkpoint import SttModel
from kyutai_stt.engine.kyutai.decoding import SlotDecoding, keyterm_trie
from kyutai_stt.engine.kyutai.info import FIRST_PIECE_TOKEN
from kyutai_stt.engine.kyutai.engine import (MIN_FLUSH_SECONDS, StepOutput, default_frames_per_step,
                                             encoder_frames_per_call, flush_frame_count)


def padded_stream(model: SttModel, pcm: np.ndarray, flush_seconds: float = MIN_FLUSH_SECONDS) -> np.ndarray:
    """The audio the model actually hears: silence prefix + audio zero-padded to frames + flush silence."""
    pcm = np.asarray(pcm, np.float32).reshape(-1)
    frames = -(-len(pcm) // FRAME_SIZE)
    total = (model.prefix_frames + frames + flush_frame_count(model, flush_seconds)) * FRAME_SIZE
    out = np.zeros(total, np.float32)
    start = model.prefix_frames * FRAME_SIZE
    out[start:start + len(pcm)] = pcm
    return out


@torch.no_grad()
def reference_outputs(model: SttModel, pcm: np.ndarray, flush_seconds: float = MIN_FLUSH_SECONDS,
                      mimi_frames_per_call: int | None = None, batch_invariant_mode: str | None = None,
                      options: DecodingOptions | None = None, keyterm_boost: float = 5.0,
                      resets: tuple[int, ...] = (),
                      changes: tuple[tuple[int, DecodingOptions], ...] = ()) -> list[StepOutput]:
    """``mimi_frames_per_call``: frames per Mimi call, the ``frames_per_step`` of the engine to compare with (default:
    the engine's default on the model's device, ``default_frames_per_step``). Another value gives the same codes but
    for float noise, which now and then flips one (see the module's docstring).
    ``batch_invariant_mode``: auto/on/off as for ``Engine`` (default ``$KYUTAI_STT_BATCH_INVARIANT``).
    ``options``: the stream's decoding (a sampling stream needs its ``seed``); ``resets``: frames before whose
    step the LM context is reset, as ``Engine.reset`` does (the LM only, then an init step); ``changes``:
    (frame, options) from whose step on the stream decodes with those options, as ``Engine.reconfigure`` does
    (a change at frame 0 is the same as ``options``)."""
    options = (options or DecodingOptions()).check()
    audio = torch.from_numpy(padded_stream(model, pcm, flush_seconds)).to(model.device)
    frames = audio.numel() // FRAME_SIZE
    per_call = mimi_frames_per_call or default_frames_per_step(model.device)
    audio = torch.nn.functional.pad(audio, (0, (-frames % per_call) * FRAME_SIZE))  # causal: changes nothing before
    pending = dict(changes)
    if 0 in pending:
        options = pending.pop(0).check()
    # as the engine: a stream's seed is the one of the first options that sample, kept through later changes
    sampling = [o for _, o in sorted(((0, options), *pending.items()), key=lambda c: c[0]) if o.temperature > 0]
    seed = sampling[0].seed if sampling else None
    if sampling and seed is None:
        raise ValueError("the reference needs the seed of a sampling stream")
    decoding = SlotDecoding(1, model.lm.text_card, FIRST_PIECE_TOKEN, model.device, keyterm_boost)

    def configure(new: DecodingOptions, step: int = 0) -> None:
        decoding.configure(0, new, seed, keyterm_trie(model.tokenizer, new.keyterms), step)
        decoding.set_active([(new.temperature > 0, bool(new.keyterms))])

    configure(options)
    decoding.exec_mask = torch.ones(1, dtype=torch.bool, device=model.device)
    lm_gen = LMGen(model.lm, temp=0.0, temp_text=0.0, on_text_logits_hook=decoding.on_text_logits,
                   on_text_hook=decoding.on_text_token)
    # the engine's attention caches (sized for its largest Mimi call), so that its codes are bitwise these
    fit_encoder_attention(model.mimi, encoder_frames_per_call(
        model.device, batch_invariant.resolve_mode(batch_invariant_mode), per_call))
    outputs: list[StepOutput] = []
    with batch_invariant.enabled_for(model.device, batch_invariant_mode), model.mimi.streaming(1), \
            lm_gen.streaming(1):
        for chunk in audio.view(-1, per_call * FRAME_SIZE):
            codes = model.mimi.encode(chunk[None, None])
            for j in range(per_call):
                index = len(outputs)
                if index == frames:
                    break
                if index in resets and index > 0:
                    lm_gen.reset_streaming(decoding.exec_mask)
                    decoding.reset_terms(decoding.exec_mask)
                if index == 0 or index in resets:
                    lm_gen.step(codes[:, :, :1])  # the init step: its input is replaced by the initial tokens
                if index in pending:
                    configure(pending[index], index + 1)
                tokens, heads = lm_gen.step_with_extra_heads(codes[:, :, j:j + 1])
                pauses = tuple(float(h[0, 0, 0]) for h in heads) if heads else None
                outputs.append(StepOutput(index, int(tokens[0, 0, 0]), pauses, 0))
    return outputs
