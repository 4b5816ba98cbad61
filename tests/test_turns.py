"""The turn layer (``stream.turns``) and the dialects that speak of turns: /v1/stream's turn events, Deepgram Flux
(/v2/listen, with deepgram-sdk, Pipecat and LiveKit), OpenAI Realtime's turn detection; each protocol's idle policy."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets

from kyutai_stt.engine.contract import ModelInfo, StreamEnd
from kyutai_stt.engine.kyutai.engine import flush_frame_count
from kyutai_stt.engine.kyutai.info import describe
from kyutai_stt.messages.events import (EagerEndOfTurn, EndOfTurn, Marker, SpeechStarted, Step, Text,
    TurnResumed, Word)
from kyutai_stt.stream.reader import OutputReader
from kyutai_stt.stream.turns import TurnThresholds, TurnTracker

from .conftest import FLUSH_SECONDS, start_server
from .helpers import expected_words
from .test_agents import KEY, deepgram_client, int16

TURN_EVENTS = (SpeechStarted, EagerEndOfTurn, TurnResumed, EndOfTurn)


# ------------------------------------------------------------------------------ the tracker, step by step
INFO = ModelInfo(name="t", family="test", pieces=("",) * 8, first_piece_token=4, padding_token=3, boundary_token=0,
                 sample_rate=24000, frame_size=1920, delay_frames=0, prefix_frames=0, frames_per_step=1,
                 flush_frames=6, vad_horizons=(0.5, 1.0, 2.0, 3.0), end_of_turn_head=2)


def step(frame: int, pause: float) -> Step:
    return Step(step_idx=frame, pause_probabilities=(0.0, 0.0, pause, 0.0))


def turn_events(tracker: TurnTracker, events) -> list:
    out = []
    for event in events:
        out += [e for e in tracker.feed(event) if isinstance(e, TURN_EVENTS)]
    return out


def test_tracker_turns_without_flush():
    tracker = TurnTracker(INFO, TurnThresholds(eot=0.6, eager=0.4))
    out = turn_events(tracker, events := [
        step(0, 0.9),  # a high pause before any speech ends nothing
        Text(text=" he", time=0.08), step(1, 0.1), Word(text="he", start_time=0.08),
        step(2, 0.45),  # eager crossing
        Text(text=" so", time=0.24),  # speech goes on
        step(3, 0.2), step(4, 0.7),  # both crossings: eager at once; "so" is still being spelt: the end waits
        Word(text="so", start_time=0.24), step(5, 0.9),
        EndOfTurn(probability=0.9, time=0.4),  # the reader's own end is dropped
        Text(text=" x", time=0.5),
    ])
    assert [type(e) for e in out] == [SpeechStarted, EagerEndOfTurn, TurnResumed, EagerEndOfTurn, EndOfTurn,
                                      SpeechStarted]
    assert out[4].time == 0.32 and out[4].probability == 0.7 and tracker.turn_index == 1
    # the end comes right after the turn's last word, not before it
    tracker = TurnTracker(INFO, TurnThresholds(eot=0.6, eager=0.4))
    stream = [e for event in events for e in tracker.feed(event)]
    assert stream.index(out[4]) == stream.index(Word(text="so", start_time=0.24)) + 1


def test_tracker_turns_with_flush():
    flushed = []
    tracker = TurnTracker(INFO, TurnThresholds(eot=0.6, eager=0.4), flush=flushed.append)
    out = turn_events(tracker, [Text(text=" a", time=0.0), Word(text="a", start_time=0.0), step(1, 0.1), step(2, 0.5)])
    assert [type(e) for e in out] == [SpeechStarted] and len(flushed) == 1  # the eager end waits for its flush
    # the audio before the flush still belongs to the turn: no new turn, no resumption
    out = turn_events(tracker, [Text(text=" b", time=0.1), Word(text="b", start_time=0.1), step(3, 0.8),
                                Marker(id=flushed[0])])
    assert [type(e) for e in out] == [EagerEndOfTurn, EndOfTurn]  # the end came during the flush: right after
    assert tracker.feed(Marker(id=5)) == [Marker(id=5)]  # a client's marker passes
    # a forced end with no turn under way ends nothing (Flux's state machine); during a turn: its flush, then the end
    assert turn_events(tracker, [step(4, 0.1), Marker(id=tracker.force_end())]) == []
    marker = tracker.force_end()
    out = turn_events(tracker, [Text(text=" d", time=0.3), Word(text="d", start_time=0.3), Marker(id=marker)])
    assert out == [SpeechStarted(time=0.3), EndOfTurn(probability=0.1, time=0.32, trigger="manual")]  # asked at 0.32
    # the timeout: no new text for timeout_s
    tracker.thresholds = TurnThresholds(eot=0.99, timeout_s=0.2)
    out = turn_events(tracker, [Text(text=" c", time=0.4), Word(text="c", start_time=0.4), step(6, 0.1),
                                step(8, 0.1)])
    assert [type(e) for e in out] == [SpeechStarted] and len(flushed) == 2
    assert turn_events(tracker, [Marker(id=flushed[1])]) == [EndOfTurn(probability=0.1, time=0.64, trigger="timeout")]


def test_thresholds_checked():
    for bad in (dict(eot=1.5), dict(eot=0.5, eager=0.7), dict(timeout_s=0)):
        with pytest.raises(ValueError):
            TurnThresholds(**bad)


# ------------------------------------------------------------------------------ servers
@pytest.fixture(scope="module")
def turns_server(checkpoint_dir):
    with start_server(checkpoint_dir, slots=4, api_keys=[KEY], idle_timeout_s=1.5) as running:
        yield running


def model_info(reference) -> ModelInfo:
    return describe(reference.model, 2, flush_frame_count(reference.model, FLUSH_SECONDS))


def reference_turns(reference, pcm, thresholds: TurnThresholds) -> list:
    """The turn events of a stream of ``pcm`` (ended by the client), from the single-stream reference outputs read
    as the session reads them, through the turn layer without flushes (``/v1/stream``)."""
    info = model_info(reference)
    outputs = reference.outputs(pcm)
    reader, tracker = OutputReader(info), TurnTracker(info, thresholds)
    events = []
    for out in outputs:
        for event in reader.step(out, 0):
            events += tracker.feed(event)
    reader.set_audio_end(len(pcm) / 24000)
    for event in reader.end(StreamEnd(frames=len(outputs))):
        events += tracker.feed(event)
    return [e for e in events if isinstance(e, TURN_EVENTS)]


async def events_stream(server, pcm: np.ndarray, query: str = "") -> list[dict]:
    """Every message of a /v1/stream stream of ``pcm`` (float32), sent in 0.2 s chunks, then ended."""
    url = f"{server.ws}/v1/stream?format=pcm_f32le&api_key={KEY}{query}"
    async with websockets.connect(url, max_size=None) as ws:
        for i in range(0, len(pcm), 4800):
            await ws.send(pcm[i:i + 4800].astype("<f4").tobytes())
        await ws.send(json.dumps({"type": "end"}))
        return [json.loads(message) async for message in ws]


def rounded(event: dict) -> dict:
    """Probabilities to 1e-4: the batched engine's and the batch-1 reference's differ by ~1e-7 (README)."""
    return {k: round(v, 4) if k == "probability" else v for k, v in event.items()}


@pytest.mark.slow  # 6 s clips through the batch-1 reference and the engine (~1-2 min on 2 cores)
async def test_events_turns_with_neighbour(turns_server, reference, sounds):
    pcm, other = sounds(6.0, 81), sounds(2.0, 82)
    thresholds = TurnThresholds(eot=0.53, eager=0.51)  # the random checkpoint's pause head hovers about 0.5
    want = [rounded(e.model_dump()) for e in reference_turns(reference, pcm, thresholds)]
    assert {e["type"] for e in want} >= {"speech_started", "eager_end_of_turn", "end_of_turn"}, "a clip with turns"
    mine, neighbour = await asyncio.gather(
        events_stream(turns_server, pcm, "&eot_threshold=0.53&eager_eot_threshold=0.51"),
        events_stream(turns_server, other))
    got = [rounded(e) for e in mine if e["type"] in ("speech_started", "eager_end_of_turn", "turn_resumed", "end_of_turn")]
    assert got == want
    # every word of a turn comes before its end
    turn_words, ends = 0, 0
    for message in mine:
        if message["type"] == "word":
            turn_words += 1
        elif message["type"] == "end_of_turn":
            assert turn_words, "an end of turn with no word before it"
            turn_words, ends = 0, ends + 1
    assert ends == sum(e["type"] == "end_of_turn" for e in want)
    assert [(m["text"], m["start_time"]) for m in neighbour if m["type"] == "word"] == \
        [(w.text, w.start) for w in expected_words(reference.model, reference.outputs(other))]


async def test_events_turn_query_refused(turns_server):
    for query in ("eot_threshold=1.5", "eager_eot_threshold=0.8&eot_threshold=0.5", "eot_timeout_ms=5"):
        async with websockets.connect(f"{turns_server.ws}/v1/stream?api_key={KEY}&{query}") as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd.code == 1008, query


# ------------------------------------------------------------------------------ Deepgram Flux
def check_flux_states(turns) -> None:
    """developers.deepgram.com/docs/flux/state: StartOfTurn opens a turn, EagerEndOfTurn (non-empty) awaits its end,
    TurnResumed only after it, EndOfTurn with the eager transcript; turn_index moves on after each EndOfTurn."""
    state, index, eager = "initial", 0, None
    for m in turns:
        assert m.turn_index == index, m
        if m.event == "StartOfTurn":
            assert state == "initial", m
            state = "ongoing"
        elif m.event == "Update":
            assert state in ("ongoing", "awaiting"), m
        elif m.event == "EagerEndOfTurn":
            assert state == "ongoing" and m.transcript, m
            state, eager = "awaiting", m.transcript
        elif m.event == "TurnResumed":
            assert state == "awaiting", m
            state, eager = "ongoing", None
        elif m.event == "EndOfTurn":
            assert state in ("ongoing", "awaiting"), m
            assert eager is None or m.transcript == eager, m
            state, eager, index = "initial", None, index + 1


@pytest.mark.slow  # 6 s clips through the batch-1 reference and the engine (~1-2 min on 2 cores)
async def test_flux_sdk_turns(turns_server, reference, sounds):
    from deepgram.listen.v2.types import ListenV2TurnInfo

    data, heard = int16(sounds(6.0, 81))
    # the turn's end (decided while the audio is all in) flushes the stream there: its words are those a flush at
    # the end of the audio makes final: the same as a Finalize, and (minimal finalize) as the end of the stream
    want = " ".join(w.text for w in expected_words(reference.model, reference.outputs(heard)))
    more, _ = int16(sounds(1.0, 83))
    other = sounds(2.0, 82)
    messages = []

    async def flux():
        async with deepgram_client(turns_server).listen.v2.connect(
                model="flux-general-en", encoding="linear16", sample_rate=24000, eot_threshold=0.53,
                eager_eot_threshold=0.51) as socket:
            await socket.send_media(data)  # in one message: the end of turn is decided once it is all in
            async for message in socket:
                messages.append(message)
                kind = getattr(message, "event", message.type)
                if kind == "EndOfTurn" and message.trigger == "model" and message.turn_index == 0:
                    # from now on only the client ends turns (eot_threshold 1.0): more audio, then ForceEndTurn
                    await socket.send_configure({"type": "Configure", "thresholds": {"eot_threshold": 1.0}})
                elif kind == "ConfigureSuccess":
                    await socket.send_media(more)
                    await socket.send_force_end_turn()
                elif kind == "EndOfTurn" and message.trigger == "manual":
                    await socket.send_close_stream()

    _, neighbour = await asyncio.gather(asyncio.wait_for(flux(), 240), events_stream(turns_server, other))
    assert messages[0].type == "Connected"
    assert [m.sequence_id for m in messages] == list(range(len(messages)))
    turns = [m for m in messages if isinstance(m, ListenV2TurnInfo)]
    check_flux_states(turns)
    first_end = next(m for m in turns if m.event == "EndOfTurn")
    assert (first_end.transcript, first_end.trigger, first_end.turn_index) == (want, "model", 0)
    assert [w.word for w in first_end.words] == want.split()
    assert [m.event for m in turns[:turns.index(first_end)] if m.event != "Update"] == ["StartOfTurn", "EagerEndOfTurn"]
    assert first_end.audio_window_end <= len(heard) / 24000  # client time: the flush silence is not counted
    configured = next(m for m in messages if m.type == "ConfigureSuccess")
    assert configured.thresholds.eot_threshold == 1.0 and configured.thresholds.eager_eot_threshold == 0.51
    assert any(m.event == "EndOfTurn" and m.trigger == "manual" for m in turns)
    assert [(m["text"], m["start_time"]) for m in neighbour if m["type"] == "word"] == \
        [(w.text, w.start) for w in expected_words(reference.model, reference.outputs(other))]


# ------------------------------------------------------------------------------ OpenAI Realtime
def realtime_client(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.http + "/v1", api_key=KEY)


def session_update(turn_detection) -> dict:
    return {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                                         "turn_detection": turn_detection}}}


async def test_realtime_commit_empty(turns_server, reference, sounds):
    """case24: a commit of an empty, < 100 ms or already committed buffer is an error and creates no item; then
    a long silence (push to talk) does not close the session (OpenAI has no idle close)."""
    import base64

    short, _ = int16(np.full(1200, 0.01, np.float32))  # 50 ms
    speech, _ = int16(sounds(1.5, 84))
    heard = np.frombuffer(short + speech, "<i2").astype(np.float32) / 32768
    want = " ".join(w.text for w in expected_words(reference.model, reference.outputs(heard)))
    async with realtime_client(turns_server).realtime.connect(extra_query={"intent": "transcription"}) as rt:
        assert (await rt.recv()).type == "session.created"
        await rt.session.update(session=session_update(None))
        assert (await rt.recv()).type == "session.updated"
        await rt.input_audio_buffer.commit(event_id="c1")
        empty = await rt.recv()
        assert (empty.type, empty.error.code, empty.error.event_id) == ("error", "input_audio_buffer_commit_empty", "c1")
        await rt.input_audio_buffer.append(audio=base64.b64encode(short).decode())
        await rt.input_audio_buffer.commit(event_id="c2")
        small = await rt.recv()
        assert small.error.code == "input_audio_buffer_commit_empty" and "50.00 ms" in small.error.message
        await asyncio.sleep(2.0)  # idle past the server's idle_timeout_s (1.5 s): still open
        await rt.input_audio_buffer.append(audio=base64.b64encode(speech).decode())
        await rt.input_audio_buffer.commit(event_id="c3")
        await rt.input_audio_buffer.commit(event_id="c4")  # at once: nothing new
        await rt.input_audio_buffer.append(audio=base64.b64encode(short + short + short).decode())
        await rt.input_audio_buffer.clear()  # its words dropped; the committed item's kept (it dropped them before)
        kinds = []
        async with asyncio.timeout(90):  # the events wanted, or a failure (never a hang)
            async for event in rt:
                kinds.append(event.type)
                if event.type == "error":
                    assert event.error.code == "input_audio_buffer_commit_empty" and event.error.event_id == "c4"
                if event.type == "conversation.item.input_audio_transcription.completed":
                    assert event.transcript == want
                    assert event.usage.seconds == pytest.approx(heard.size / 24000, abs=1e-3)  # its audio, no flush
                if event.type == "conversation.item.done":
                    assert event.item.content[0].transcript == want and event.previous_item_id is None
                    break
    assert kinds.count("input_audio_buffer.committed") == 1 and "input_audio_buffer.speech_started" not in kinds
    assert kinds.index("input_audio_buffer.committed") + 1 == kinds.index("conversation.item.added")
    # answered in order, as OpenAI does: c3's committed at once, then c4's error (it overtook it before)
    assert kinds.index("input_audio_buffer.committed") < kinds.index("error") < kinds.index(
        "input_audio_buffer.cleared")


async def test_realtime_turn_detection_parameters(turns_server):
    async with realtime_client(turns_server).realtime.connect(extra_query={"intent": "transcription"}) as rt:
        assert (await rt.recv()).type == "session.created"
        refused = {"threshold": {"type": "server_vad", "threshold": 0.8},
                   "silence_duration_ms": {"type": "server_vad", "silence_duration_ms": 300},
                   "idle_timeout_ms": {"type": "server_vad", "idle_timeout_ms": 5000},
                   "eagerness": {"type": "semantic_vad", "eagerness": "very"},
                   "turn_detection": {"type": "push_to_talk"}}
        for param, turn in refused.items():
            await rt.session.update(session=session_update(turn))
            error = await rt.recv()
            assert error.type == "error" and error.error.param.endswith(param), (param, error)
        await rt.session.update(session=session_update({"type": "semantic_vad", "eagerness": "high"}))
        updated = await rt.recv()
        assert updated.session.audio.input.turn_detection.type == "semantic_vad"
        assert updated.session.audio.input.turn_detection.eagerness == "high"
        await rt.session.update(session=session_update(
            {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 1000, "prefix_padding_ms": 300}))
        updated = await rt.recv()
        detection = updated.session.audio.input.turn_detection
        assert (detection.silence_duration_ms, detection.prefix_padding_ms) == (1000, 300)


@pytest.mark.slow  # 6 s clips through the batch-1 reference and the engine (~1-2 min on 2 cores)
async def test_realtime_server_vad_items(turns_server, reference, sounds):
    """case25: items split where the turn layer ends turns (the VAD head, after the turn's last word), each with
    speech_started first, deltas that spell its completed transcript, and audio_start_ms in client time."""
    import base64

    data, heard = int16(sounds(6.0, 85))  # three ends of turn at the server's threshold (0.5)
    info = model_info(reference)
    threshold = turns_server.app.state.service.settings.end_of_turn_threshold  # server_vad's
    reader, tracker = OutputReader(info), TurnTracker(info, TurnThresholds(eot=threshold))
    items, starts, current = [], [], None
    outputs = reference.outputs(heard)
    for out in outputs:
        for event in (e for raw in reader.step(out, 0) for e in tracker.feed(raw)):
            if isinstance(event, Text) and current is None:
                current = []
                starts.append(round(event.time * 1000))
            elif isinstance(event, Word):
                current.append(event.text)
            elif isinstance(event, EndOfTurn) and current is not None:
                items.append(" ".join(current))
                current = None
    assert len(items) >= 2, "a clip with several turns"
    async with realtime_client(turns_server).realtime.connect(extra_query={"intent": "transcription"}) as rt:
        await rt.recv()
        await rt.session.update(session=session_update({"type": "server_vad"}))
        await rt.recv()
        await rt.input_audio_buffer.append(audio=base64.b64encode(data).decode())
        # a commit at once (case25's part 1): it commits what is left after the turns the VAD still ends in that
        # audio, so the items before it split as without it
        await rt.input_audio_buffer.commit()
        events = []
        async with asyncio.timeout(90):  # the events wanted, or a failure (never a hang)
            async for event in rt:
                events.append(event)
                if sum(e.type == "conversation.item.done" for e in events) == len(items):
                    break
    by_item: dict[str, list] = {}
    for event in events:
        if getattr(event, "item_id", None):
            by_item.setdefault(event.item_id, []).append(event)
    got = []
    for item_id, its in by_item.items():
        assert its[0].type == "input_audio_buffer.speech_started", [e.type for e in its]
        completed = next(e for e in its if e.type.endswith(".completed"))
        assert "".join(e.delta for e in its if e.type.endswith(".delta")) == completed.transcript
        got.append((its[0].audio_start_ms, completed.transcript))
    assert got == list(zip(starts, items))
    # each item as OpenAI's: committed, at once the item added (no transcript yet), and once completed the item
    # done with its transcript; each after the one before
    kinds = ("input_audio_buffer.committed", "conversation.item.added",
             "conversation.item.input_audio_transcription.completed", "conversation.item.done")
    of = {kind: [e for e in events if e.type == kind] for kind in kinds}
    committed, added, completed, done = of.values()
    ids = [e.item_id for e in committed]
    assert [e.item.id for e in added] == ids == [e.item_id for e in completed] == [e.item.id for e in done]
    assert [e.previous_item_id for e in added] == [None] + ids[:-1] == [e.previous_item_id for e in done]
    assert [e.item.content[0].transcript for e in added] == [None] * len(ids)
    assert [e.item.content[0].transcript for e in done] == [e.transcript for e in completed]
    assert [events.index(e) for e in added] == [events.index(e) + 1 for e in committed]
    assert [events.index(e) for e in done] == [events.index(e) + 1 for e in completed]


@pytest.mark.slow  # waits out the turn's end at the engine's pace (~20 s of a loaded 2-core CPU)
async def test_pipecat_flux_stt_service(turns_server, reference, sounds):
    from pipecat.frames.frames import InputAudioRawFrame, TranscriptionFrame
    from pipecat.pipeline.task import PipelineParams
    from pipecat.services.deepgram.flux.stt import DeepgramFluxSTTService
    from pipecat.tests.utils import SleepFrame, run_test

    data, heard = int16(sounds(6.0, 81))
    want = " ".join(w.text for w in expected_words(reference.model, reference.outputs(heard)))
    stt = DeepgramFluxSTTService(api_key=KEY, url=turns_server.ws + "/v2/listen", sample_rate=24000,
                                 settings=DeepgramFluxSTTService.Settings(eot_threshold=0.53))
    # one frame, so the end of turn is decided once the audio is all in (Pipecat's watchdog waits 2x its length)
    down, _ = await run_test(stt, frames_to_send=[InputAudioRawFrame(audio=data, sample_rate=24000, num_channels=1),
                                                  SleepFrame(sleep=45)],
                             pipeline_params=PipelineParams(audio_in_sample_rate=24000), start_timeout=10)
    finals = [f.text for f in down if isinstance(f, TranscriptionFrame)]
    assert finals and finals[0] == want  # Flux's EndOfTurn is Pipecat's final transcription


@pytest.mark.slow  # waits out the turn's end at the engine's pace (~35 s of a loaded 2-core CPU)
async def test_livekit_flux_stt_v2(turns_server, reference, sounds):
    """LiveKit's Deepgram ``STTv2`` (Flux), pointed here by ``base_url``: its final transcript is the first
    ``EndOfTurn``, whose words are every word of the audio so far (the turn's end flushes the stream)."""
    import aiohttp
    from livekit import rtc
    from livekit.agents.stt import SpeechEventType
    from livekit.plugins.deepgram import STTv2

    data, heard = int16(sounds(6.0, 81))
    want = " ".join(w.text for w in expected_words(reference.model, reference.outputs(heard)))
    events = []
    async with aiohttp.ClientSession() as http:
        # one 6 s chunk (the plugin repacks audio into chunks of this length), so the end of turn is decided once
        # the audio is all in, as in the deepgram-sdk and Pipecat tests above
        stt = STTv2(api_key=KEY, base_url=turns_server.ws + "/v2/listen", sample_rate=24000, eot_threshold=0.53,
                    audio_chunk_duration_ms=6000, http_session=http)
        stream = stt.stream()
        stream.push_frame(rtc.AudioFrame(data=data, sample_rate=24000, num_channels=1,
                                         samples_per_channel=len(data) // 2))

        async def read():
            async for event in stream:
                events.append(event)
                if event.type == SpeechEventType.END_OF_SPEECH:
                    return

        await asyncio.wait_for(read(), 120)
        await stream.aclose()
    kinds = [e.type for e in events if e.type != SpeechEventType.RECOGNITION_USAGE]
    assert kinds[0] == SpeechEventType.START_OF_SPEECH and kinds[-2:] == [SpeechEventType.FINAL_TRANSCRIPT,
                                                                          SpeechEventType.END_OF_SPEECH]
    final = events[-2].alternatives[0]
    assert final.text == want and [str(w) for w in final.words] == want.split()
