"""Per-stream decoding on the batched LM: sampling exact per (seed, step), and keyterm boosting.

Both run inside moshi's own ``LMGen`` through its two hooks (moshi is not patched): ``on_text_logits_hook`` sees
the text logits ``[B, 1, 1, card]`` before LMGen picks a token, ``on_text_hook`` sees the picked tokens ``[B]``.
LMGen runs greedy (``temp_text=0``: argmax). For a row that samples or boosts, the logits hook computes the choice
itself and writes back a one-hot row (0 at the choice, -inf elsewhere), so LMGen's argmax picks it whatever the
model's dtype; every other row is left untouched, so a stream that uses neither is bit-identical to an engine
without this module. When no stream in the engine uses them, both hooks return at once (a host flag).

Sampling is Gumbel-max: ``argmax((logits + bias) / T + G)`` with ``G = -log(-log(U))`` is an exact draw from
``softmax((logits + bias) / T)``. ``U`` comes from a counter-based hash of (stream seed, stream step, token id):
integer tensor ops on the device, no generator state, so a stream's draws depend on nothing but its seed and its
own step (not its slot, neighbours or the batch size), and the reference loop draws the same. The step counts the
stream's LM steps from its first (the init step is step 0) and goes on across context resets. Full-distribution
sampling, no top-k: Kyutai's production STT config (unmute's stt-prod.toml) sets only the temperature.

Keyterms: each stream's terms are tokenized as the tokenizer encodes them ("▁" + word pieces) into a trie; its row
of the device tables holds the trie's edges. At the root the first piece of every term gets ``boost`` added to its
logit; once a term's piece was emitted, only its continuations are boosted. Tokens below the first piece
(padding, word boundary) leave the position in the trie as it is (a multi-word term goes on after a boundary); any
other piece moves to that child, else re-enters at the root. All tensor ops over fixed shapes, no host sync.
"""

from __future__ import annotations

import math

import torch

from kyutai_stt.engine.contract import DecodingOptions

MAX_EDGES = 2048  # trie edges (pieces) per stream: a few hundred terms of a few pieces each
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values below 2**32; the multipliers
    are below 2**31, so no product overflows int64 and every device computes the same bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[B, card]`` from (seed ``[B]``, step ``[B]``, token id ``[card]``) only."""
    row = _mix32(_mix32(seed & _M32) ^ (step & _M32))
    h = _mix32((row[:, None] + token_ids[None, :] * 0x61C88647) & _M32)
    h = _mix32(h ^ row[:, None])
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # 24 bits: exact in float32, in (0, 1)
    return -torch.log(-torch.log(u))


def keyterm_trie(tokenizer, terms: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """(parent node, token, child node) edges of the terms' tokenizations; node 0 is the root."""
    children: dict[tuple[int, int], int] = {}
    for term in terms:
        node = 0
        for token in tokenizer.encode(term.strip()):
            key = (node, int(token))
            if key not in children:
                children[key] = len(children) + 1
            node = children[key]
    if len(children) > MAX_EDGES:
        raise ValueError(f"the keyterms come to {len(children)} pieces; at most {MAX_EDGES} per stream")
    return [(parent, token, child) for (parent, token), child in children.items()]


class SlotDecoding:
    """The decoding state of every slot, on the device; the two hooks LMGen calls. Owned by the engine's worker
    thread (``configure``, ``reset_terms``, ``exec_mask`` and ``active`` are set between LM steps)."""

    def __init__(self, slots: int, card: int, first_piece_token: int, device: torch.device, boost: float):
        self.slots, self.device, self.boost, self.first_piece = slots, device, float(boost), first_piece_token
        self.active = False  # some stream in the engine samples or boosts (host flag: nothing to do otherwise)
        self.exec_mask: torch.Tensor | None = None  # the rows that step in the current LM step
        self._token_ids = torch.arange(card, device=device)
        self._sampling = torch.zeros(slots, dtype=torch.bool, device=device)
        self._boosting = torch.zeros(slots, dtype=torch.bool, device=device)
        self._temperature = torch.ones(slots, dtype=torch.float32, device=device)
        self._seed = torch.zeros(slots, dtype=torch.long, device=device)
        self._step = torch.zeros(slots, dtype=torch.long, device=device)
        self._node = torch.zeros(slots, dtype=torch.long, device=device)
        self._edges: torch.Tensor | None = None  # [3, slots, MAX_EDGES] parent/token/child, made at first use
        self._any_sampling = self._any_boosting = False

    def configure(self, slot: int, options: DecodingOptions, seed: int | None, edges, step: int = 0) -> None:
        """A new stream in ``slot`` (called at its reset): its temperature, seed and keyterm trie, step 0; or new
        options mid-stream (``Engine.reconfigure``): from ``step`` on, outside any term (a new trie)."""
        sampling, boosting = options.temperature > 0, bool(edges)
        self._sampling[slot] = sampling
        self._boosting[slot] = boosting
        self._temperature[slot] = options.temperature if sampling else 1.0
        self._seed[slot] = seed or 0
        self._step[slot] = step
        self._node[slot] = 0
        if boosting or self._edges is not None:
            if self._edges is None:
                self._edges = torch.full((3, self.slots, MAX_EDGES), -1, dtype=torch.long, device=self.device)
            row = torch.full((3, MAX_EDGES), -1, dtype=torch.long)
            if edges:
                row[:, :len(edges)] = torch.tensor(edges, dtype=torch.long).T
            self._edges[:, slot] = row.to(self.device)

    _ROWS = ("_sampling", "_boosting", "_temperature", "_seed", "_step", "_node")

    def copy_row(self, src: "SlotDecoding", src_row: int, row: int) -> None:
        """Row ``row`` becomes ``src``'s row ``src_row`` (a slot moving into or out of the lane)."""
        for name in self._ROWS:
            getattr(self, name)[row] = getattr(src, name)[src_row]
        if src._edges is not None or self._edges is not None:
            if self._edges is None:
                self._edges = torch.full((3, self.slots, MAX_EDGES), -1, dtype=torch.long, device=self.device)
            if src._edges is None:
                self._edges[:, row] = -1
            else:
                self._edges[:, row] = src._edges[:, src_row]

    def set_active(self, used: list[tuple[bool, bool]]) -> None:
        """Before a step: (samples, boosts) of every stream in the engine (free slots' stale rows cost nothing)."""
        self._any_sampling = any(s for s, _ in used)
        self._any_boosting = any(b for _, b in used)
        self.active = self._any_sampling or self._any_boosting

    def reset_terms(self, mask: torch.Tensor) -> None:
        """A context reset: the masked rows leave any term they were in (their step count goes on)."""
        self._node = torch.where(mask, 0, self._node)

    # ------------------------------------------------------------------ LMGen's hooks
    def on_text_logits(self, logits: torch.Tensor) -> None:
        if not self.active:
            return
        view = logits[:, 0, 0]  # [B, card]
        scores = view.float()
        rows = torch.zeros_like(self._sampling)
        if self._any_boosting:
            parent, token, _ = self._edges
            entering = (parent == self._node[:, None]) & self._boosting[:, None]
            bias = torch.zeros_like(scores).scatter_add_(1, token.clamp(min=0), entering.float() * self.boost)
            scores = scores + bias  # the other entries add exact zeros
            rows = rows | self._boosting
        if self._any_sampling:
            noisy = scores / self._temperature[:, None] + gumbel_noise(self._seed, self._step, self._token_ids)
            scores = torch.where(self._sampling[:, None], noisy, scores)
            rows = rows | self._sampling
        choice = scores.argmax(-1)
        one_hot = torch.where(self._token_ids[None, :] == choice[:, None], 0.0, -math.inf).to(view.dtype)
        view.copy_(torch.where(rows[:, None], one_hot, view))

    def on_text_token(self, token: torch.Tensor) -> None:
        if not self.active:
            return
        stepping = self.exec_mask
        self._step = torch.where(stepping, self._step + 1, self._step)
        if self._any_boosting:
            parent, edge_token, child = self._edges
            same = edge_token == token[:, None]
            inside = torch.where(same & (parent == self._node[:, None]), child, -1).amax(1)
            entered = torch.where(same & (parent == 0), child, 0).amax(1)
            moved = torch.where(inside >= 0, inside, entered)
            moved = torch.where(token >= self.first_piece, moved, self._node)  # padding, boundary: stay
            self._node = torch.where(stepping & self._boosting, moved, self._node)
