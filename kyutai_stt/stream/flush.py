"""Finalize a live stream without ending it (Deepgram's ``Finalize``, OpenAI Realtime's ``input_audio_buffer.commit``,
the server's own end of turn).

A finalize must give exactly what the end of a stream gives for the audio so far, so it is the same flush: the
audio is zero-padded to a whole frame, then ``ModelInfo.flush_frames`` frames of silence follow (the model's delay,
so the text of the last audio frame comes out, plus one frame by default: see ``engine.kyutai.engine.
flush_frame_count``), and the word in progress is then closed (``Session.push_marker(..., finalize=True)``). The
model is causal, so the tokens up to that point are those of a stream that ends there, and the words and times are
equal (tested). A frame or so of silence more may follow so that the stream's frames fill whole engine steps
(``frames_per_step``): the engine steps a live stream only in whole steps, and the finalize must not wait for the
next audio. The silence becomes part of the stream; ``Timeline`` takes it out of the times given to the client.
A finalize with no audio since the last one (or before any audio) has nothing to flush: it feeds nothing, and its
marker comes back once the frames the stream already has are stepped (the last flush's tail: at most a step), with
whatever word they spelt closed, so a turn's eager end and its end still see the same words. Feeding a flush there
cost the engine a flush's frames for nothing, and the model heard that silence before the next audio.

When the other streams are waiting for audio, the Kyutai engine steps the flush in its lane (a small batch stepped
instead of the full one: ``engine.kyutai.lane``), so the final words wait for a few small steps, not full-batch ones.
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
    # the stream's samples at the end of the last flush, and its frames then (the prefix's included; none yet: 0, 0)
    last_flush: tuple[int, int] = (0, 0)

    def client_time(self, t: float) -> float:
        for at, length in self.inserted:
            if t > at:
                t = max(at, t - length)
        return t


def flush_frames_after(samples: int, info) -> tuple[int, int]:
    """For a stream that has ``samples`` samples so far: (zero samples that complete its last frame, silent frames
    after it). The silent frames are ``info.flush_frames`` plus what fills the last engine step."""
    pad = -samples % FRAME_SIZE
    frames = (samples + pad) // FRAME_SIZE + info.prefix_frames + info.flush_frames
    return pad, info.flush_frames + (-frames % info.frames_per_step)


def flush_now(session: Session, marker_id: int, timeline: Timeline) -> float:
    """Feed the flush and a finalizing marker (see the module docstring): ``Marker(marker_id)`` comes once every
    word of the audio so far is out and closed. Returns the client time where the audio ended."""
    info = session.engine.info
    at = session.samples_received / SAMPLE_RATE
    client_at = timeline.client_time(at)  # the silences of earlier flushes taken out
    flushed_to, frames_then = timeline.last_flush
    if session.samples_received == flushed_to:  # no audio since: nothing to feed, the stream's frames to step
        session.push_marker(marker_id, finalize=True, frames=frames_then)
        return client_at
    pad, frames = flush_frames_after(session.samples_received, info)
    # a marker is echoed once the frames of the audio before it and the model's delay are transcribed: placed
    # after (flush - delay) frames of silence, that is exactly the end of the flush
    before = info.flush_frames - info.delay_frames
    session.push_pcm(np.zeros(pad + before * FRAME_SIZE, np.float32))
    session.push_marker(marker_id, finalize=True)
    # a model with look-ahead past its steps (NeMo's chunks) steps the marker's frame only once the look-ahead
    # after its chunk is in too
    lookahead = getattr(info, "lookahead_frames", 0)  # 0 for Kyutai (and the tests' stand-in infos)
    session.push_pcm(np.zeros((frames - before + lookahead) * FRAME_SIZE, np.float32))
    timeline.inserted.append((client_at, session.samples_received / SAMPLE_RATE - at))
    # (a look-ahead model steps its frames only with the look-ahead after them: those stay for the next audio)
    timeline.last_flush = (session.samples_received,
                           session.samples_received // FRAME_SIZE + info.prefix_frames - lookahead)
    return client_at


def end_now(session: Session, timeline: Timeline) -> None:
    """The client ended its audio. With none since the last flush (or none at all) the stream ends without the
    end's own flush: the last flush made every word final, and more silence would only cost its frames and give
    the model more to spell (so a Finalize then CloseStream gives the words of CloseStream alone)."""
    session.end(flush=session.samples_received != timeline.last_flush[0])


def mark_now(session: Session, marker_id: int, timeline: Timeline) -> None:
    """A plain marker (Kyutai's ``Marker``, ``/v1/stream``'s ``marker``): echoed once every frame of the audio so
    far is transcribed, the model's delay included. Right after a flush, with no audio since, that audio is already
    through: the marker waits only for the frames the stream has, as a repeated finalize does (else it waited for
    the delay's worth of audio to come, and a later flush behind it too)."""
    flushed_to, frames_then = timeline.last_flush
    session.push_marker(marker_id, frames=frames_then if 0 < flushed_to == session.samples_received else None)
