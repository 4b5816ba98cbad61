"""Per-stream streaming state: measured on moshi's modules, and computed from a checkpoint's config."""

from __future__ import annotations

import contextlib
from dataclasses import fields, is_dataclass
from typing import Any


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        with contextlib.suppress(Exception):
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key in seen or key == 0:
                return 0
            seen.add(key)
            return storage.nbytes()
        return obj.numel() * obj.element_size()
    if is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name), seen) for f in fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    if type(obj).__name__.endswith("Cache"):  # moshi's RingKVCache is a plain class
        return sum(_tensor_bytes(x, seen) for x in vars(obj).values())
    return 0


def streaming_state_bytes(module) -> dict[str, int]:
    """Bytes of tensors held in moshi streaming states, per top-level child (e.g. encoder, decoder, transformer)."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for name, sub in module.named_modules():
        state = getattr(sub, "_streaming_state", None)
        if state is None:
            continue
        key = name.split(".")[0] or "(root)"
        out[key] = out.get(key, 0) + _tensor_bytes(state, seen)
    return out


def measure_state_memory(stt) -> dict:
    """Per-stream streaming state, measured: bytes at batch 2 minus bytes at batch 1, Mimi and LM separately."""
    import torch
    from moshi.models import LMGen

    def at(batch: int) -> tuple[dict, dict]:
        gen = LMGen(stt.lm, temp=0.0, temp_text=0.0)
        with stt.mimi.streaming(batch), gen.streaming(batch):
            # LMGen's modules include the LM itself: walking it counts the LM's KV caches once
            return streaming_state_bytes(stt.mimi), {"lm": sum(streaming_state_bytes(gen).values())}

    with torch.no_grad():
        m1, l1 = at(1)
        m2, l2 = at(2)
    mimi = {k: m2.get(k, 0) - m1.get(k, 0) for k in m2}
    return {
        "lm_bytes_per_stream": l2["lm"] - l1["lm"],
        "mimi_bytes_per_stream": sum(mimi.values()),
        "mimi_by_part": {k: v for k, v in mimi.items() if v},
    }


def formula_state_memory(config: dict, lm_dtype_bytes: int) -> dict:
    """Per-stream state from the checkpoint's config: LM ring KV cache and Mimi's transformer KV caches.

    LM: 2 (K and V) x layers x context x dim x bytes. Mimi (float32, moshi's fixed Mimi config): encoder and
    decoder transformers of 8 layers, d_model 512, context 250 each; ``mimi.streaming`` sets up both although
    STT only encodes. Convolution state buffers are small and not counted here (the measured figure has them).
    """
    from moshi.models.loaders import _transformer_kwargs

    lm = 2 * config["num_layers"] * config["context"] * config["dim"] * lm_dtype_bytes
    t = _transformer_kwargs
    mimi_one = 2 * t["num_layers"] * t["context"] * t["d_model"] * 4
    return {
        "lm_kv_bytes_per_stream": lm,
        "mimi_encoder_kv_bytes_per_stream": mimi_one,
        "mimi_decoder_kv_bytes_per_stream": mimi_one,
        "total_bytes_per_stream": lm + 2 * mimi_one,
    }


def dtype_bytes(dtype: str, device: str) -> int:
    if dtype in ("bfloat16", "bf16", "float16", "fp16"):
        return 2
    if dtype == "auto":
        return 2 if device.startswith("cuda") else 4
    return 4


def mib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**20, 2)
