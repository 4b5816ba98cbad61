"""The stall watchdog (issue 20): a checkpoint built to stall (``make_stall_checkpoint``: after a trigger piece it
emits only padding while speech goes on) loses every word after the stall; the watchdog resets the context after
``stall_seconds`` of speech without text and the words come back, exactly the reference's with the context reset
at the reported frames. No false trigger on real speech with the regular test checkpoint."""

from __future__ import annotations

import httpx
import pytest

from kyutai_stt.client import Client
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.reference import reference_outputs
from kyutai_stt.engine.kyutai.testing_checkpoint import make_stall_checkpoint
from kyutai_stt.messages.events import Reset, Step
from kyutai_stt.stream.watchdog import StallWatchdog
from kyutai_stt.engine.contract import StepOutput

from .conftest import FLUSH_SECONDS, start_server
from .helpers import expected_words, words_of

STALL_SECONDS = 2.0


@pytest.fixture(scope="module")
def stall(checkpoint_dir, bria, tmp_path_factory):
    clip = bria[: 24000 * 14].copy()
    folder, trigger = make_stall_checkpoint(checkpoint_dir, tmp_path_factory.mktemp("stall"), clip)
    return folder, trigger, clip


def words(model, outputs, audio_seconds: float):
    return [(w.text, round(w.start, 4), round(w.end, 4)) for w in expected_words(model, outputs, audio_seconds)]


async def test_watchdog_recovers_the_words_of_a_stalled_stream(stall):
    folder, trigger, clip = stall
    model = load_model(str(folder), "cpu", "float32")
    stalled = reference_outputs(model, clip, FLUSH_SECONDS)
    tokens = [o.token for o in stalled]
    start = tokens.index(trigger)
    assert set(tokens[start + 1:]) == {3}  # the rut: padding only, to the end
    with start_server(folder, slots=2, stall_seconds=STALL_SECONDS) as server:
        events = [e async for e in Client(server.http).stream(clip, steps=True)]
        metrics = httpx.get(server.http + "/metrics").text
    resets = [e for e in events if isinstance(e, Reset)]
    assert resets and all(r.reason == "stall" for r in resets)
    frames = tuple(round(r.time * 12.5) + model.prefix_frames for r in resets)
    # the first reset comes after STALL_SECONDS of loud steps since the trigger, not before
    assert frames[0] - start >= STALL_SECONDS * 12.5
    recovered = reference_outputs(model, clip, FLUSH_SECONDS, resets=frames)
    seconds = len(clip) / 24000
    assert words_of(events) == words(model, recovered, seconds)
    lost_after = [w for w in words(model, stalled, seconds) if w[1] >= frames[0] / 12.5]
    found_after = [w for w in words_of(events) if w[1] >= frames[0] / 12.5]
    assert not lost_after and found_after  # words that were lost are there
    assert f'kyutai_stt_context_resets_total{{reason="stall"}} {float(len(resets))}' in metrics
    assert len([e for e in events if isinstance(e, Step)]) == len(stalled)  # the clock went on


@pytest.mark.slow  # 28 s of speech through the server
async def test_no_false_trigger_on_real_speech(server, bria):
    events = [e async for e in Client(server.http).stream(bria)]
    assert not [e for e in events if isinstance(e, Reset)]
    assert server.app.state.service.settings.stall_seconds == 6.0  # the default watchdog was on


def test_watchdog_counts_only_loud_voiced_padding(reference):
    info = reference.model  # only for the frame layout below
    from kyutai_stt.engine.kyutai.info import describe

    model_info = describe(info, 1, 10)
    dog = StallWatchdog(model_info, stall_seconds=0.4)  # 5 steps
    import numpy as np

    lead = model_info.lead_frames
    dog.feed_audio(np.concatenate([np.full(1920 * 10, 0.1, np.float32), np.zeros(1920 * 10, np.float32)]))
    out = lambda frame, token=3, pause=0.1: StepOutput(frame, token, (pause, 0.5, 0.5, 0.5), 0)  # noqa: E731
    assert not any(dog.step(out(f)) for f in range(lead, lead + 4))
    assert not dog.step(out(lead + 4, token=0))  # a boundary clears the count
    assert not any(dog.step(out(f, pause=0.9)) for f in range(lead + 5, lead + 10))  # the VAD hears no voice
    assert not any(dog.step(out(f)) for f in range(lead + 10, lead + 20))  # silence
    dog.feed_audio(np.full(1920 * 5, 0.1, np.float32))
    assert [dog.step(out(f)) for f in range(lead + 20, lead + 25)] == [False] * 4 + [True]
