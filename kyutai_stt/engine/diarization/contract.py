"""The diarizer's contract, torch-free: what ``stream.speakers`` needs of any streaming diarizer.

A stream opens with a sink, pushes its 24 kHz audio (any lengths), then closes (the diarizer pads the last chunk
with silence) or aborts. The sink is called on the diarizer's thread with ``SpeakerFrames`` (activity
probabilities of every speaker for consecutive frames of the stream, in order) and finally ``DiarizationEnd``.
"""

from __future__ import annotations

from typing import Callable, Protocol, Union

import msgspec
import numpy as np


class DiarizerInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    speakers: int  # the most speakers it tells apart
    frame_seconds: float  # one output frame
    chunk_frames: int  # frames per step: a stream's labels come a chunk at a time
    offset_seconds: float  # stream time of frame 0's start (a right context makes it negative)
    random_weights: bool = False


class SpeakerFrames(msgspec.Struct, frozen=True):
    first_frame: int
    probabilities: list[list[float]]  # [frame][speaker], sigmoid activities in [0, 1]


class DiarizationEnd(msgspec.Struct, frozen=True):
    frames: int  # frames labelled in all


DiarizationEvent = Union[SpeakerFrames, DiarizationEnd]
DiarizationSink = Callable[[list[DiarizationEvent]], None]


class Diarizer(Protocol):
    info: DiarizerInfo

    def open(self, sink: DiarizationSink) -> int: ...

    def push(self, handle: int, pcm: np.ndarray) -> None: ...

    def close(self, handle: int) -> None: ...

    def abort(self, handle: int) -> None: ...

    def stop(self) -> None: ...
