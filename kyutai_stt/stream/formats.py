"""Transcript formats: text, JSON, SRT and WebVTT from timed words; with ``speakers`` (one per word, from a
diarized session), cues break where the speaker changes and carry its label (SRT ``[Speaker 1] ...``, WebVTT's
voice tag ``<v Speaker 1>``)."""

from __future__ import annotations

import json
from typing import Sequence

from kyutai_stt.stream.words import TimedWord

MAX_CUE_WORDS = 12
MAX_CUE_SECONDS = 6.0
CUE_GAP_SECONDS = 1.0
MIN_CUE_SECONDS = 0.3  # a cue is shown at least this long when the words around it leave room


def speaker_label(speaker: int) -> str:
    return f"Speaker {speaker + 1}"


def cues(words: Sequence[TimedWord], speakers: Sequence[int | None] | None = None) -> list[list[TimedWord]]:
    """Group words into subtitle cues: break on a pause, a long cue, many words, or another speaker."""
    groups: list[list[TimedWord]] = []
    who = {id(w): s for w, s in zip(words, speakers)} if speakers is not None else {}
    for word in words:
        current = groups[-1] if groups else None
        if (current is None or len(current) >= MAX_CUE_WORDS or word.start - current[0].start > MAX_CUE_SECONDS
                or word.start - current[-1].end > CUE_GAP_SECONDS or who.get(id(word)) != who.get(id(current[-1]))):
            groups.append([word])
        else:
            current.append(word)
    return groups


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(max(0.0, seconds) * 1000))
    h, rest = divmod(ms, 3600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def cue_times(words: Sequence[TimedWord], duration: float | None = None,
              speakers: Sequence[int | None] | None = None) -> list[tuple[float, float, list[TimedWord]]]:
    """(start, end, words) of each cue. A cue lasts at least ``MIN_CUE_SECONDS`` when there is room, but never
    overlaps the next cue and never ends after ``duration`` (the end of the audio), so players show one cue at a
    time and no cue outlives the audio."""
    groups = cues(words, speakers)
    out = []
    for i, group in enumerate(groups):
        start = group[0].start
        end = max(group[-1].end, group[-1].start + MIN_CUE_SECONDS)
        if i + 1 < len(groups):
            end = min(end, groups[i + 1][0].start)
        if duration is not None:
            end = min(end, duration)
        out.append((start, max(end, start), group))
    return out


def to_text(words: Sequence[TimedWord]) -> str:
    return " ".join(w.text for w in words)


def _speakers_of(words: Sequence[TimedWord], speakers: Sequence[int | None] | None) -> dict[int, int | None]:
    return {id(w): s for w, s in zip(words, speakers)} if speakers is not None else {}


def to_srt(words: Sequence[TimedWord], duration: float | None = None,
           speakers: Sequence[int | None] | None = None) -> str:
    blocks = []
    who = _speakers_of(words, speakers)
    for i, (start, end, group) in enumerate(cue_times(words, duration, speakers), 1):
        speaker = who.get(id(group[0]))
        label = f"[{speaker_label(speaker)}] " if speaker is not None else ""
        blocks.append(f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{label}" + " ".join(w.text for w in group)
                      + "\n")
    return "\n".join(blocks)


def to_vtt(words: Sequence[TimedWord], duration: float | None = None,
           speakers: Sequence[int | None] | None = None) -> str:
    blocks = ["WEBVTT\n"]
    who = _speakers_of(words, speakers)
    for start, end, group in cue_times(words, duration, speakers):
        speaker = who.get(id(group[0]))
        label = f"<v {speaker_label(speaker)}>" if speaker is not None else ""
        blocks.append(f"{_clock(start, '.')} --> {_clock(end, '.')}\n{label}" + " ".join(w.text for w in group)
                      + "\n")
    return "\n".join(blocks)


def to_json(words: Sequence[TimedWord], **extra) -> str:
    payload = {"text": to_text(words), "words": [{"text": w.text, "start": round(w.start, 3), "end": round(w.end, 3)}
                                                for w in words], **extra}
    return json.dumps(payload, ensure_ascii=False, indent=2)


def render(fmt: str, words: Sequence[TimedWord], **extra) -> str:
    if fmt == "text":
        return to_text(words)
    if fmt == "json":
        return to_json(words, **extra)
    if fmt == "srt":
        return to_srt(words, extra.get("duration"), extra.get("speakers"))
    if fmt == "vtt":
        return to_vtt(words, extra.get("duration"), extra.get("speakers"))
    raise ValueError(f"unknown format {fmt!r}: use text, json, srt or vtt")
