"""Flush a live stream without ending it (Deepgram's ``Finalize``, OpenAI Realtime's ``input_audio_buffer.commit``).

The engine only flushes a stream when it ends, so this feeds the same thing through the session: the audio so far
is zero-padded to a whole frame and followed by the engine's flush silence (the model's delay plus
``flush_seconds``: ``ModelInfo.flush_frames``), then one frame more, since the engine steps a stream's last whole
frame only once the next one is there. A session marker placed inside that silence is echoed exactly when the
frames of the flush have been transcribed, i.e. when every word of the audio before it has come out, with the same
outputs as at the end of a stream (the model is causal). The silence becomes part of the stream; ``Timeline``
takes it out of the times given to the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE
from kyutai_stt.stream.session import Session


@dataclass
class Timeline:
    """Stream time (with the flush silences) to client time (without them), in seconds."""

    inserted: list[tuple[float, float]] = field(default_factory=list)  # (client time where it starts, length)

    def client_time(self, t: float) -> float:
        for at, length in self.inserted:
            if t > at:
                t = max(at, t - length)
        return t


def flush_now(session: Session, marker_id: int, timeline: Timeline) -> float:
    """Feed the flush and a marker (see the module docstring). Returns the client time where the audio ended."""
    info = session.engine.info
    at = session.samples_received / SAMPLE_RATE
    client_at = timeline.client_time(at)  # the silences of earlier flushes taken out
    pad = -session.samples_received % FRAME_SIZE
    after = info.flush_frames - info.delay_frames
    # the marker is echoed once frames_done >= ceil(samples / frame) + delay + prefix: placed after `after` frames
    # of silence, that is when the engine's whole flush (delay + flush_seconds) has been transcribed
    session.push_pcm(np.zeros(pad + after * FRAME_SIZE, np.float32))
    session.push_marker(marker_id)
    # a model with look-ahead past its steps (NeMo's chunks) steps the marker's frame once its whole chunk and the
    # look-ahead are in: up to a step less one frame, plus the look-ahead
    lookahead = getattr(info, "lookahead_frames", 0)  # 0 for Kyutai (and the tests' stand-in infos)
    after = info.delay_frames + 1 if not lookahead else info.frames_per_step + lookahead
    session.push_pcm(np.zeros(after * FRAME_SIZE, np.float32))
    timeline.inserted.append((client_at, session.samples_received / SAMPLE_RATE - at))
    return client_at
