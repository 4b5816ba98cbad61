"""The edges: typed wire messages, the error map, typed query parameters (unknown ones refused, stereo PCM mixed
down), and the engine's own wait for a free slot."""

from __future__ import annotations

import json
import threading
import time

import msgpack
import numpy as np
import pytest

from kyutai_stt.audio.constants import FRAME_SIZE
from kyutai_stt.audio.decode import AudioFormatError
from kyutai_stt.engine.kyutai.checkpoint import load_model
from kyutai_stt.engine.kyutai.engine import Engine, EngineStopped, NoFreeSlot
from kyutai_stt.messages import kyutai as kyutai_wire
from kyutai_stt.messages.errors import MessageError, UnknownMessage
from kyutai_stt.messages.events import EndControl, FlushControl, MarkerControl, StreamQuery, parse_control
from kyutai_stt.serve.protocols.errors import InvalidPayload, PolicyViolation, close_for
from kyutai_stt.stream.session import SessionLimitError

from .conftest import start_server
from .hardening import exchange, gather, ref_words, wait_idle, words_of
from .test_bad_input import events_of


# ------------------------------------------------------------------------------------------------ messages
def test_every_mid_stream_flush_is_taken_out_of_client_times():
    """Two flushes (Deepgram's Finalize, OpenAI's commit): stream times after both map back to the client's audio,
    and each flush reports where the client's audio before it ended."""
    from types import SimpleNamespace

    from kyutai_stt.stream.flush import Timeline, flush_now

    class FakeSession:
        samples_received = 0
        engine = SimpleNamespace(info=SimpleNamespace(delay_frames=2, flush_frames=2 + 3, prefix_frames=0,
                                                      frames_per_step=2))  # 0.24 s of flush: 3 frames

        def push_pcm(self, pcm):
            self.samples_received += len(pcm)

        def push_marker(self, marker_id, finalize=False):
            assert finalize  # the flush's marker closes the word in progress

    session, timeline = FakeSession(), Timeline()
    session.push_pcm(np.zeros(FRAME_SIZE * 25))  # 2 s of client audio
    assert flush_now(session, 1, timeline) == 2.0
    first = session.samples_received / 24000 - 2.0  # the first flush's silence
    session.push_pcm(np.zeros(FRAME_SIZE * 25))  # 2 s more
    assert flush_now(session, 2, timeline) == pytest.approx(4.0)
    second = session.samples_received / 24000 - 4.0 - first
    assert timeline.client_time(1.0) == 1.0
    assert timeline.client_time(2.0 + first / 2) == pytest.approx(2.0)  # inside the first silence
    assert timeline.client_time(3.0 + first) == pytest.approx(3.0)
    assert timeline.client_time(4.0 + first + second / 2) == pytest.approx(4.0)  # inside the second silence
    assert timeline.client_time(5.0 + first + second) == pytest.approx(5.0)


def test_deepgram_finalize_ends_the_pending_word_where_the_client_audio_ended():
    """After an earlier Finalize, the pending word still ends where the audio before this Finalize ended: the
    finalizing marker closes it inside the flush's silence (stream time), which is client time 4.0, and the
    from_finalize result carries it."""
    from kyutai_stt.messages.events import Word, WordEnd
    from kyutai_stt.serve.protocols.deepgram import ListenOptions, _Transcript
    from kyutai_stt.stream.flush import Timeline

    timeline = Timeline(inserted=[(2.0, 0.48), (4.0, 0.48)])  # two flushes of 0.48 s, at client 2 s and 4 s
    transcript = _Transcript(ListenOptions(), "request", "model", "uuid")
    transcript.shift = timeline.client_time
    transcript.finalize()  # the Finalize's flush was fed
    assert transcript.on_event(Word(text="hello", start_time=3.5 + 0.48)) == []  # stream time
    assert transcript.on_event(WordEnd(stop_time=4.0 + 0.48 + 0.2)) == []  # held for the from_finalize result
    (result,) = transcript.finalized(4.0)
    word = result.channel.alternatives[0].words[0]
    assert (word.start, word.end, result.from_finalize) == (3.5, 4.0, True)


def test_deepgram_plain_word_drops_punctuation_not_spaces():
    from kyutai_stt.serve.protocols.deepgram import _plain

    assert [_plain(t) for t in ("Hello!", "don't", "Brec brec,", "...")] == ["hello", "don't", "brec brec", "..."]


def test_deepgram_finals_tile_the_audio_and_a_finalize_covers_it_to_the_end():
    """A final is "a transcript of all audio up to that point": a Finalize's result ends where the audio before it
    ended, after the silence that followed the last word, and the next result starts there."""
    from kyutai_stt.messages.events import Word, WordEnd
    from kyutai_stt.serve.protocols.deepgram import ListenOptions, _Transcript

    transcript = _Transcript(ListenOptions(), "request", "model", "uuid")
    transcript.on_event(Word(text="hello", start_time=0.5))
    (first,) = transcript.on_event(WordEnd(stop_time=1.0))  # a final result, before any Finalize
    transcript.finalize()
    (done,) = transcript.finalized(2.5)  # the audio went on, silent, to 2.5 s: no word was left
    transcript.on_event(Word(text="world", start_time=3.0))
    (after,) = transcript.on_event(WordEnd(stop_time=3.4))
    assert [(r.start, r.duration, r.from_finalize) for r in (first, done, after)] == [
        (0.0, 1.0, False), (1.0, 1.5, True), (2.5, 0.9, False)]
    # in the rounded times the client reads too: Finalizes at 0.06256 s and 0.834125 s of audio
    transcript = _Transcript(ListenOptions(), "request", "model", "uuid")
    for audio_end in (0.06256, 0.834125):
        transcript.finalize()
        (last,) = transcript.finalized(audio_end)
    assert (last.start, last.duration) == (0.0626, 0.7715)  # it ends at 0.8341: the end, rounded


def test_the_client_and_the_wire_messages_import_no_torch_moshi_or_pyav():
    """A client machine needs neither torch, moshi nor PyAV: import the client and every messages module in a fresh
    interpreter and look at what came with them."""
    import pkgutil
    import subprocess
    import sys

    import kyutai_stt.messages

    modules = ["kyutai_stt.client", "kyutai_stt.audio.constants", "kyutai_stt.audio.chunks"] + [
        f"kyutai_stt.messages.{m.name}" for m in pkgutil.iter_modules(kyutai_stt.messages.__path__)]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(' '.join(m for m in ('torch', 'moshi', 'av', 'julius', 'triton') if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert len(modules) > 5 and heavy == []


def test_kyutai_messages_round_trip_and_refuse_with_a_reason():
    pcm = np.array([0.25, -0.5, 2.0], np.float32)
    audio = kyutai_wire.parse_client_message(kyutai_wire.pack(kyutai_wire.Audio(pcm=pcm), single_float=True))
    assert isinstance(audio, kyutai_wire.Audio) and audio.pcm.tolist() == [0.25, -0.5, 1.0]  # clipped
    assert kyutai_wire.parse_client_message(msgpack.packb({"type": "Marker", "id": 7, "extra": 1})) \
        == kyutai_wire.Marker(id=7)  # unknown fields are ignored, as moshi-server's serde does
    step = kyutai_wire.Step(step_idx=3, prs=[0.1, 0.9], buffered_pcm=1920)
    assert kyutai_wire.parse_server_message(kyutai_wire.pack(step)) == step
    assert msgpack.unpackb(kyutai_wire.pack(kyutai_wire.Ready())) == {"type": "Ready"}
    with pytest.raises(MessageError, match="unknown message type 'Word'"):  # a server message, sent by a client
        kyutai_wire.parse_client_message(kyutai_wire.pack(kyutai_wire.Word(text="a", start_time=0.0)))
    with pytest.raises(MessageError, match="Marker.id must be an integer"):
        kyutai_wire.parse_client_message(msgpack.packb({"type": "Marker", "id": "7"}))


def test_events_controls_and_query():
    assert parse_control('{"type": "end"}') == EndControl()
    assert parse_control('{"type": "marker", "id": 3}') == MarkerControl(id=3)
    assert parse_control('{"type": "flush"}') == FlushControl(id=None)
    assert parse_control('{"type": "flush", "id": 9}') == FlushControl(id=9)
    for bad in ('{"type": "marker", "id": 1.0}', '{"type": "flush", "id": "9"}'):
        with pytest.raises(UnknownMessage):
            parse_control(bad)
    with pytest.raises(MessageError) as bad_json:
        parse_control("{")
    assert not isinstance(bad_json.value, UnknownMessage)
    assert StreamQuery.model_validate({}) == StreamQuery(format="opus", sample_rate=24000, channels=1, steps=False)
    assert StreamQuery.model_validate({"format": "pcm_s16le", "channels": "2", "steps": "on"}).channels == 2
    for bad in ({"channels": "3", "format": "pcm_f32le"}, {"format": "opus", "channels": "2"}, {"rate": "16000"}):
        with pytest.raises(ValueError):
            StreamQuery.model_validate(bad)


def test_one_map_from_errors_to_close_codes():
    assert close_for(AudioFormatError("not an Ogg stream")) == (1007, "not an Ogg stream")
    assert close_for(SessionLimitError("stream longer than the 10 s limit"))[0] == 1008  # a ValueError, yet 1008
    assert close_for(UnknownMessage("unknown control"))[0] == 1008  # a MessageError (1007), yet 1008
    assert close_for(MessageError("malformed msgpack"))[0] == 1007
    assert close_for(NoFreeSlot("full"))[0] == 1013
    assert close_for(EngineStopped("x")) == (1011, "the transcription engine is not running")
    assert close_for(InvalidPayload("bad")) == (1007, "bad")
    assert close_for(PolicyViolation("x" * 500)) == (1008, "x" * 120)  # a close reason fits in 123 bytes
    assert close_for(KeyError("secret internals")) == (1011, "internal error")


# ------------------------------------------------------------------------------------------------ engine.open
def test_engine_open_waits_on_its_condition_for_a_free_slot(checkpoint_dir):
    engine = Engine(load_model(str(checkpoint_dir), "cpu", "float32"), slots=1).start()
    try:
        first = engine.open(lambda events: None)
        start = time.monotonic()
        with pytest.raises(NoFreeSlot):
            engine.open(lambda events: None, timeout=0.3)
        assert time.monotonic() - start >= 0.3
        got = []
        waiter = threading.Thread(target=lambda: got.append(engine.open(lambda events: None, timeout=30)))
        waiter.start()
        time.sleep(0.2)
        assert not got  # still waiting
        released = time.monotonic()
        engine.abort(first)
        waiter.join(10)
        assert got and time.monotonic() - released < 1.0  # woken by the release, not by polling or the timeout
        stopper = threading.Thread(target=lambda: (time.sleep(0.2), engine.stop()))
        stopper.start()
        with pytest.raises(EngineStopped):
            engine.open(lambda events: None, timeout=30)
        stopper.join()
    finally:
        engine.stop()


# ------------------------------------------------------------------------------------------------ queries
@pytest.fixture(scope="module")
def edge_server(checkpoint_dir):
    with start_server(checkpoint_dir, slots=4, api_keys=["k"]) as running:
        yield running


async def test_unknown_query_parameters_are_refused_on_every_websocket(edge_server):
    ws = edge_server.ws
    results = await gather(
        exchange(ws + "/v1/stream?api_key=k&format=pcm_f32le&language=fr", []),
        exchange(ws + "/api/asr-streaming?auth_id=k&format=pcm", []),
        exchange(ws + "/ws?api_key=k&x=1", []),
        exchange(ws + "/v1/stream?api_key=k&format=pcm_f32le&format=opus", []),
        exchange(ws + "/v1/stream?api_key=k&format=opus&channels=2", []),
        exchange(ws + "/v1/stream?api_key=k&format=pcm_s16le&channels=6", []),
    )
    language, kyutai, seed, repeated, opus_channels, six = results
    # the list of accepted parameters (multichannel, diarize, turn thresholds, decoding) no longer fits a close
    # reason whole: parse_query cuts it to fit a close frame
    assert language.code == 1008 and language.reason.startswith(
        "unknown query parameter 'language' (accepted: format, sample_rate, channels, ")
    assert (kyutai.code, kyutai.reason) == (1008, "unknown query parameter 'format' (accepted: api_key, auth_id)")
    assert (seed.code, seed.reason) == (1008, "unknown query parameter 'x' (accepted: api_key, auth_id)")
    assert (repeated.code, repeated.reason) == (1008, "query parameter 'format' given more than once")
    assert opus_channels.code == 1008 and opus_channels.reason.startswith("channels applies to raw PCM")
    assert six.code == 1008 and six.reason.startswith("more than 2 channels needs multichannel=true")
    # the auth parameters themselves are fine, and a bad query without the key is still a 401
    ok = await exchange(ws + "/api/asr-streaming?api_key=k", [msgpack.packb({"type": "Marker", "id": "x"})])
    assert ok.code == 1007 and msgpack.unpackb(ok.received[0]) == {"type": "Ready"}
    with pytest.raises(Exception, match="401"):
        await exchange(ws + "/v1/stream?language=fr", [])
    await wait_idle(edge_server)


async def test_stereo_pcm_is_mixed_down_and_mono_is_the_default(edge_server, reference, sounds):
    left, right = sounds(1.5, 301), sounds(1.5, 302)
    frames = np.stack([left, right], axis=1).astype(np.float32)  # interleaved: L R L R ...
    mono = frames.mean(axis=1)  # the mixdown: the mean of the two channels
    stereo_f32 = frames.reshape(-1).astype("<f4").tobytes()
    s16 = np.round(np.stack([left, right], axis=1) * 16384).astype("<i2")  # halves: no clipping in the sum
    stereo_s16 = s16.reshape(-1).tobytes()
    mono_s16 = (s16.astype(np.float32).mean(axis=1) / 32768).astype(np.float32)
    end = json.dumps({"type": "end"})

    def cut(data: bytes) -> list[bytes]:  # odd sizes: frames split across messages
        return [data[i:i + 3001] for i in range(0, len(data), 3001)]

    base = edge_server.ws + "/v1/stream?api_key=k&sample_rate=24000"
    f32, i16, declared_mono = await gather(
        exchange(base + "&format=pcm_f32le&channels=2", cut(stereo_f32) + [end]),
        exchange(base + "&format=pcm_s16le&channels=2", cut(stereo_s16) + [end]),
        exchange(base + "&format=pcm_f32le", cut(mono.astype("<f4").tobytes()) + [end]))
    assert f32.code == i16.code == declared_mono.code == 1000
    want = ref_words(reference, mono)
    assert want and words_of(events_of(f32)) == want == words_of(events_of(declared_mono))
    assert words_of(events_of(i16)) == ref_words(reference, mono_s16)
    await wait_idle(edge_server)
