"""The stall watchdog: speech goes in, only padding comes out, for too long.

Kyutai's 1b model sometimes stops transcribing for long stretches while speech continues (a "blank rut": each
padding token makes the next one likelier). The watchdog counts the steps where the stream's audio is speech while
the model emits padding; a text piece or a word boundary clears the count. After ``stall_seconds`` of such steps it
says "reset": the session resets the stream's model context (``Engine.reset``), which keeps the stream's clock.

Speech, for a step, needs both signals:
- signal energy: the audio frame the step's token answers (``lead_frames`` earlier) has an RMS above
  ``energy_threshold`` (-40 dBFS by default), so silence and faint noise never count;
- the VAD head (models that have one): head 0's pause probability is below one half. Without heads, energy only.
Pure bookkeeping over the stream's own audio and outputs: no model, no clock.
"""

from __future__ import annotations

import numpy as np

from kyutai_stt.engine.contract import ModelInfo, StepOutput

ENERGY_THRESHOLD = 0.01  # RMS of a float PCM frame: -40 dBFS


class StallWatchdog:
    def __init__(self, info: ModelInfo, stall_seconds: float, energy_threshold: float = ENERGY_THRESHOLD):
        self._info = info
        self.stall_seconds = stall_seconds
        self._needed = max(1, round(stall_seconds * info.frame_rate))
        self._threshold = energy_threshold
        self._loud = bytearray()  # per audio frame of the stream: 1 when its RMS is above the threshold
        self._tail = np.zeros(0, np.float32)  # the samples of the audio frame not complete yet
        self.stalled_steps = 0  # speech steps with padding only, since the last text (or reset)

    def feed_audio(self, pcm: np.ndarray) -> None:
        """The stream's 24 kHz audio, as the session pushes it."""
        size = self._info.frame_size
        pcm = np.concatenate([self._tail, np.asarray(pcm, np.float32).reshape(-1)])
        whole = pcm.size // size * size
        if whole:
            frames = pcm[:whole].reshape(-1, size)
            rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
            self._loud.extend((rms > self._threshold).astype(np.uint8).tobytes())
        self._tail = pcm[whole:]

    def step(self, out: StepOutput) -> bool:
        """One step's output; True when the stream has stalled (the count starts again)."""
        if out.token >= self._info.first_piece_token or out.token == self._info.boundary_token:
            self.stalled_steps = 0
            return False
        frame = out.frame - self._info.lead_frames
        loud = 0 <= frame < len(self._loud) and self._loud[frame] == 1
        voiced = out.pauses is None or not out.pauses or out.pauses[0] < 0.5
        if loud and voiced:
            self.stalled_steps += 1
        if self.stalled_steps >= self._needed:
            self.stalled_steps = 0
            return True
        return False

    def reset(self) -> None:
        """The context was reset (by the watchdog or the client): count afresh."""
        self.stalled_steps = 0
