"""The lane: a second, small batch of moshi streaming states, so that when few streams have frames to step (one
client; a finalize's flush while the others wait for audio) the step computes only ``lane_slots`` rows instead of
the engine's ``slots`` rows (issue 19).

moshi keeps streaming state on its modules (``_streaming_state``), one object per module, each holding tensors
with the batch on some dimension. The lane does not copy any module: it makes a second set of states, of batch
``lane_slots``, for the very same Mimi, ``LMGen`` and LM modules (so the parameters are the same tensors by
construction), and swaps them in for a lane step (``active``) with moshi's own ``set_streaming_state``. A slot
enters the lane by copying its row of every main state into a lane row (``gather``), and leaves by copying it back
(``scatter``); copies are in place, so tensors captured by CUDA graphs stay where they are.

Which state holds what per row (moshi 0.2.13; ``_ROW_FIELDS``; an unknown state class is refused, so a moshi
that adds state fails at start, not silently):
- Mimi's convolutions (``_StreamingConv1dState``): ``previous`` [B, C, T] and ``first`` [B].
- Attention (``_MHAState``): ``offset`` [B] (the rotary position) and the ``RingKVCache``: ``cache``
  [2, B, heads, capacity, dim] (batch on dim 1) and ``end_offset`` [B] (per row: the caches respect the exec mask).
- Transformers (``_TransformerState``): ``offsets`` [B]; ``LMGen``: ``cache`` [B, codebooks, delay + 2] and
  ``offsets`` [B]; ``exec_mask`` [B] everywhere (set before every step, never copied).
- Python ints shared by the whole batch: ``offset_cpu`` of attention, layers and ``LMGen``. moshi uses the
  attention and layer ones only for ``weights_per_step`` (the depformer, absent from STT models: refused below),
  and ``LMGen``'s only to return None before its ``max_delay`` steps (0 for STT models: every step returns tokens).
  So no row's result depends on them; the lane's own count goes on by itself. In the main batch they are already
  shared by rows at different positions for the same reason.
The per-row state of the decoding hooks (``decoding.SlotDecoding``) moves with the row (``SlotDecoding.copy_row``).

Rows of the lane that carry no slot are paused with the exec mask like idle slots of the main batch.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from moshi.models import LMGen, MimiModel
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache

from kyutai_stt.engine.kyutai.decoding import SlotDecoding

_KV = "kv"  # a RingKVCache: cache on dim 1, end_offset on dim 0
_ROW_FIELDS: dict[str, dict[str, int | str]] = {
    "State": {},  # containers (StreamingContainer), nothing per row but the exec mask
    "_MimiState": {},  # CUDA graphs only
    "_StreamingConv1dState": {"previous": 0, "first": 0},
    "_StreamingConvTr1dState": {"partial": 0},  # Mimi's decoder side (detached in the engine: never streaming)
    "_MHAState": {"offset": 0, "kv_cache": _KV},
    "_LayerState": {},  # offset_cpu only (weights_per_step)
    "_TransformerState": {"offsets": 0},
    "_LMGenState": {"cache": 0, "offsets": 0},
}


def _row_tensors(state) -> list[tuple[torch.Tensor, int]]:
    """(tensor, batch dim) of every per-row tensor of one module's streaming state, fetched now (moshi reassigns
    some, e.g. ``LMGen``'s offsets, at every step)."""
    fields = _ROW_FIELDS.get(type(state).__name__)
    if fields is None:
        raise TypeError(f"the lane does not know moshi's {type(state).__name__}: which rows to move")
    out = []
    for name, dim in fields.items():
        value = getattr(state, name)
        if value is None:
            continue
        if dim == _KV:
            assert isinstance(value, RingKVCache) and value.respect_exec_mask
            out += [(value.cache, 1), (value.end_offset, 0)]
        else:
            out.append((value, dim))
    return out


def _copy_row(src: dict, src_row: int, dst: dict, dst_row: int) -> None:
    for name, src_state in src.items():
        for (a, dim), (b, _) in zip(_row_tensors(src_state), _row_tensors(dst[name])):
            b.select(dim, dst_row).copy_(a.select(dim, src_row))


class Lane:
    """``size`` rows of streaming state for ``mimi``, ``lm_gen`` and its LM, beside the engine's own states, which
    must be in streaming mode already. ``decoding``: the lane's rows of the decoding hooks. Worker thread only."""

    def __init__(self, mimi: MimiModel, lm_gen: LMGen, size: int, decoding: SlotDecoding, stack: ExitStack):
        if lm_gen.lm_model.depformer is not None:
            raise ValueError("the lane needs a model without a depformer (weights_per_step state is shared)")
        self.size = size
        self.decoding = decoding
        self._modules: tuple[StreamingModule, ...] = (mimi, lm_gen, lm_gen.lm_model)
        main = [m.get_streaming_state() for m in self._modules]
        # moshi refuses to stream a module twice: take the main states off, make the lane's, put the main back
        for module, states in zip(self._modules, main):
            module.set_streaming_state({name: None for name in states})
        try:
            stack.enter_context(mimi.streaming(size))
            stack.enter_context(lm_gen.streaming(size))  # also streams its (detached) LM at this size
            self._lane = [m.get_streaming_state() for m in self._modules]
        finally:
            for module, states in zip(self._modules, main):
                module.set_streaming_state(states)
        for states in self._lane:
            for state in states.values():
                _row_tensors(state)  # refuse unknown states now

    def _current(self) -> list[dict]:
        return [m.get_streaming_state() for m in self._modules]

    def gather(self, slot: int, row: int, main_decoding: SlotDecoding) -> None:
        """Copy a slot's state from the main batch into lane row ``row`` (main states attached)."""
        for src, dst in zip(self._current(), self._lane):
            _copy_row(src, slot, dst, row)
        self.decoding.copy_row(main_decoding, slot, row)

    def scatter(self, row: int, slot: int, main_decoding: SlotDecoding) -> None:
        """Copy lane row ``row`` back into the slot's row of the main batch (main states attached)."""
        for dst, src in zip(self._current(), self._lane):
            _copy_row(src, row, dst, slot)
        main_decoding.copy_row(self.decoding, row, slot)

    @contextmanager
    def active(self):
        """The lane's states on the modules for one lane step; the main ones back afterwards, whatever happens."""
        main = self._current()
        for module, states in zip(self._modules, self._lane):
            module.set_streaming_state(states)
        try:
            yield
        finally:
            for module, states in zip(self._modules, main):
                module.set_streaming_state(states)
