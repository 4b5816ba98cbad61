"""The ``ModelInfo`` of a Kyutai STT model: its token conventions, timing and VAD heads, in one place.

Kyutai's text stream (the "delayed streams" STT models): token 3 is padding (no new text this frame), 0 marks a word
boundary (a new word starts at this frame), 1 and 2 are never text, and every id from 4 on is a sentencepiece piece.
The LM's extra heads predict, per frame, the probability that the speaker pauses for the next 0.5, 1, 2 and 3 s;
Kyutai's tools end a turn on the 2 s head (index 2).
"""

from __future__ import annotations

from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE
from kyutai_stt.engine.contract import ModelInfo
from kyutai_stt.engine.kyutai.checkpoint import SttModel
from kyutai_stt.engine.kyutai.languages import model_languages

PADDING_TOKEN = 3
BOUNDARY_TOKEN = 0
FIRST_PIECE_TOKEN = 4
VAD_HORIZONS = (0.5, 1.0, 2.0, 3.0)  # seconds, per extra head
END_OF_TURN_HEAD = 2  # the 2 s horizon head, as Kyutai's tools use


def describe(model: SttModel, frames_per_step: int, flush_frames: int) -> ModelInfo:
    tokenizer = model.tokenizer
    heads = len(model.lm.extra_heads)
    return ModelInfo(
        name=model.name,
        family="kyutai",
        pieces=tuple(tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())),
        first_piece_token=FIRST_PIECE_TOKEN,
        padding_token=PADDING_TOKEN,
        boundary_token=BOUNDARY_TOKEN,
        sample_rate=SAMPLE_RATE,
        frame_size=FRAME_SIZE,
        delay_frames=model.delay_frames,
        prefix_frames=model.prefix_frames,
        frames_per_step=frames_per_step,
        flush_frames=flush_frames,
        vad_horizons=VAD_HORIZONS[:heads],
        end_of_turn_head=END_OF_TURN_HEAD if heads > END_OF_TURN_HEAD else None,
        languages=model_languages(model),
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        random_weights=model.random_weights,
    )
