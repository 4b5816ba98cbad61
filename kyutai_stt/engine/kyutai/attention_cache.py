"""Mimi's encoder attention sees exactly its context, however audio is grouped into calls.

moshi sizes each streaming KV cache to the attention's context: 250 steps for Mimi's encoder transformer, which
runs at 25 Hz, so 10 s. A call carrying T steps writes its T keys into the ring *before* attending, so once 10 s
have passed the first queries of the call have lost up to T - 1 of the oldest keys their context mask allows.
What a stream gets then depends on how its audio was grouped into Mimi calls: the single-stream loop calls Mimi
once per 80 ms frame (T = 2), the engine on CPU once per 2 frames (T = 4), and codes start to differ after 10 s
of audio (the soak found it: words differing late in 13-20 s clips).

With room for ``context + T - 1`` keys nothing the mask allows is ever overwritten early, so every query attends
to exactly its ``context`` previous steps (as in training, where the mask alone limits attention) and every
grouping gives the same codes. The cost is T - 1 extra cache rows per layer and slot (a few KiB).
"""

from __future__ import annotations

import types

from moshi.models import MimiModel
from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention

_EXTRA = "_kyutai_stt_extra_keys"


def _widened_init(self: StreamingMultiheadAttention, batch_size: int):
    state = type(self)._init_streaming_state(self, batch_size)
    extra = getattr(self, _EXTRA, 0)
    cache = state.kv_cache
    if cache is not None and extra > 0:
        _, batch, heads, capacity, dim = cache.cache.shape
        state.kv_cache = RingKVCache(batch, heads, dim, capacity + extra, respect_exec_mask=cache.respect_exec_mask,
                                     device=cache.cache.device, dtype=cache.cache.dtype)
    return state


def fit_encoder_attention(mimi: MimiModel, frames_per_call: int) -> None:
    """Make Mimi's encoder KV caches big enough for calls of up to ``frames_per_call`` frames (80 ms each).

    Call it before entering streaming mode; it only ever grows the caches, so a model shared by callers with
    different call sizes stays right for all of them.
    """
    if frames_per_call < 1:
        raise ValueError("frames_per_call must be >= 1")
    steps_per_frame = max(1, round(mimi.encoder_frame_rate / mimi.frame_rate))
    needed = frames_per_call * steps_per_frame - 1
    for module in mimi.encoder_transformer.modules():
        if not isinstance(module, StreamingMultiheadAttention) or module.context is None:
            continue
        if module._streaming_state is not None:
            raise RuntimeError("fit_encoder_attention must be called before Mimi enters streaming mode")
        if needed > getattr(module, _EXTRA, 0):
            setattr(module, _EXTRA, needed)
        module._init_streaming_state = types.MethodType(_widened_init, module)
