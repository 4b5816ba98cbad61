"""Voice-agent protocols with their real client packages: Deepgram's /v1/listen (deepgram-sdk, LiveKit's plugin)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import websockets
from deepgram import AsyncDeepgramClient
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results

from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE
from kyutai_stt.engine.contract import StreamEnd
from kyutai_stt.engine.kyutai.engine import flush_frame_count
from kyutai_stt.engine.kyutai.info import describe
from kyutai_stt.messages.events import EndOfTurn, Word, WordEnd
from kyutai_stt.stream.reader import OutputReader
from kyutai_stt.stream.turns import TurnThresholds, TurnTracker
from kyutai_stt.stream.words import WordAssembler, pair_words

from .conftest import FLUSH_SECONDS, start_server
from .helpers import expected_words

KEY = "agents-key"


@pytest.fixture(scope="module")
def keyed(checkpoint_dir):
    with start_server(checkpoint_dir, slots=4, api_keys=[KEY]) as running:
        yield running


def int16(pcm: np.ndarray) -> tuple[bytes, np.ndarray]:
    """linear16 bytes and the float audio the server decodes from them."""
    samples = np.clip(np.round(pcm * 32768), -32768, 32767).astype("<i2")
    return samples.tobytes(), samples.astype(np.float32) / 32768


def deepgram_client(server) -> AsyncDeepgramClient:
    env = DeepgramClientEnvironment(base=server.http, production=server.ws, agent=server.ws, agent_rest=server.http)
    return AsyncDeepgramClient(api_key=KEY, environment=env)


def words_after_finalize(reference, first: np.ndarray, second: np.ndarray):
    """What a client must get for `first`, Finalize, `second`, CloseStream: the server hears `first`, the engine's
    flush silence (filled up to a whole engine step), then `second`; times are given without that silence. The
    words before Finalize are those of a stream of `first` alone (the open word closed where the audio ended);
    after it a fresh word assembler goes on from the end of the flush."""
    model = reference.model
    flush = flush_frame_count(model, FLUSH_SECONDS)
    pad = -len(first) % FRAME_SIZE
    end = (len(first) + pad) // FRAME_SIZE + model.prefix_frames + flush  # the end of the flush, in frames
    silence = pad + (flush + -end % 2) * FRAME_SIZE  # 2: the server's frames per step on the CPU
    heard = np.concatenate([first, np.zeros(silence, np.float32), second])
    at, length = len(first) / SAMPLE_RATE, silence / SAMPLE_RATE

    def shift(t):
        return max(at, t - length) if t > at else t

    before = [(w.text, round(w.start, 4), round(w.end, 4)) for w in expected_words(model, reference.outputs(first))]
    outputs = reference.outputs(heard)
    assembler = WordAssembler(model.tokenizer.id_to_piece, model.delay_frames + model.prefix_frames)
    assembler.audio_end = heard.size / SAMPLE_RATE
    events = [e for out in outputs[end:] for e in assembler.feed(out.frame, out.token)] + assembler.finish(len(outputs))
    after = [(w.text, round(shift(w.start), 4), round(shift(w.end), 4))
             for w in pair_words(e for e in events if isinstance(e, (Word, WordEnd)))]
    return before + after, len(before)


def turn_word_counts(reference, pcm: np.ndarray, threshold: float) -> list[int]:
    """For each end of turn of a stream of ``pcm`` (ended by the client), how many words came before it: the
    single-stream reference outputs read as the session reads them, through the turn layer without flushes."""
    info = describe(reference.model, 2, flush_frame_count(reference.model, FLUSH_SECONDS))
    outputs = reference.outputs(pcm)
    reader, tracker = OutputReader(info, threshold), TurnTracker(info, TurnThresholds(eot=threshold))
    events = [e for out in outputs for event in reader.step(out, 0) for e in tracker.feed(event)]
    reader.set_audio_end(len(pcm) / SAMPLE_RATE)
    events += [e for event in reader.end(StreamEnd(frames=len(outputs))) for e in tracker.feed(event)]
    counts, words = [], 0
    for event in events:
        words += isinstance(event, Word)
        if isinstance(event, EndOfTurn):
            counts.append(words)
    return counts


def results_words(messages):
    return [(w.punctuated_word, round(w.start, 4), round(w.end, 4))
            for m in messages if isinstance(m, ListenV1Results) and m.is_final
            for w in m.channel.alternatives[0].words]


def finalizes_timed(server) -> float:
    """Finalizes the server has timed so far (/metrics' ``kyutai_stt_finalize_seconds`` histogram)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.http + "/metrics", headers={"Authorization": f"Token {KEY}"}).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "kyutai_stt_finalize_seconds"
               for s in f.samples if s.name.endswith("_count"))


async def test_deepgram_sdk_live_finalize_and_close(keyed, reference, sounds):
    """A Finalize, then more audio and CloseStream: exactly the file mode's words, the finalized ones first (with
    ``from_finalize``); the server times the finalize in /metrics. A second Finalize right after the first, with no
    audio between, feeds no flush (the model hears no more silence: the words stay the file mode's) and gets its
    own ``from_finalize`` result, with no words."""
    first, second = int16(sounds(1.6, 71)), int16(sounds(1.2, 72))
    timed = finalizes_timed(keyed)
    want, count_before = words_after_finalize(reference, first[1], second[1])
    messages = []
    async with deepgram_client(keyed).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=24000, channels=1, interim_results="true",
            punctuate="true", language="en-US", vad_events="true", utterance_end_ms=1000) as socket:
        for i in range(0, len(first[0]), 3840):
            await socket.send_media(first[0][i:i + 3840])
        await socket.send_finalize()
        await socket.send_finalize()
        async for message in socket:
            messages.append(message)
            if sum(isinstance(m, ListenV1Results) and m.from_finalize for m in messages) == 2:
                break
        assert results_words(messages) == want[:count_before]
        assert not messages[-1].channel.alternatives[0].words
        for i in range(0, len(second[0]), 3840):
            await socket.send_media(second[0][i:i + 3840])
        await socket.send_keep_alive()
        await socket.send_close_stream()
        async for message in socket:
            messages.append(message)
    assert results_words(messages) == want
    assert isinstance(messages[-1], ListenV1Metadata)
    assert messages[-1].duration == pytest.approx((len(first[1]) + len(second[1])) / SAMPLE_RATE, abs=1e-3)
    interims = [m for m in messages if isinstance(m, ListenV1Results) and not m.is_final]
    assert interims and all(m.channel.alternatives[0].transcript for m in interims)
    assert finalizes_timed(keyed) == timed + 2
    # the finals tile the audio, and a Finalize's result covers all of it up to the Finalize (silence included)
    finals = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    assert all(a.start + a.duration == pytest.approx(b.start, abs=2e-4) for a, b in zip(finals, finals[1:]))
    done = [m for m in finals if m.from_finalize]
    assert [m.start + m.duration for m in done] == pytest.approx([len(first[1]) / SAMPLE_RATE] * 2, abs=2e-4)


async def test_deepgram_finalize_then_close_adds_nothing(keyed, reference, sounds):
    """CloseStream right after a Finalize (no audio between) adds no flush: every word is in the from_finalize
    result, as for CloseStream alone, and nothing more comes (before, the end's flush silence was fed too, and
    random weights spelt a word in it); a stream with no audio at all gets no words."""
    data, heard = int16(sounds(2.0, 79))  # 25 frames: the Finalize's flush fills whole engine steps (no tail)
    want = [(w.text, round(w.start, 4), round(w.end, 4))
            for w in expected_words(reference.model, reference.outputs(heard))]
    client = deepgram_client(keyed)
    for audio in (data, b""):
        messages = []
        async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=24000) as socket:
            if audio:
                await socket.send_media(audio)
            await socket.send_finalize()
            await socket.send_close_stream()
            async for message in socket:
                messages.append(message)
        finals = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
        assert finals[0].from_finalize and all(not m.channel.alternatives[0].words for m in finals[1:])
        assert results_words(messages) == (want if audio else [])
        assert messages[-1].duration == pytest.approx(len(audio) / 2 / SAMPLE_RATE)


async def test_deepgram_bad_query_and_bad_data(keyed, reference, sounds):
    client = deepgram_client(keyed)
    from deepgram.core.api_error import ApiError

    with pytest.raises(ApiError) as refused:
        async with client.listen.v1.connect(model="nova-3", encoding="flac", sample_rate=16000):
            pass
    assert refused.value.status_code == 400
    with pytest.raises(ApiError) as unauthorized:
        async with AsyncDeepgramClient(api_key="wrong", environment=DeepgramClientEnvironment(
                base=keyed.http, production=keyed.ws, agent=keyed.ws, agent_rest=keyed.http)).listen.v1.connect(
                model="nova-3", encoding="linear16", sample_rate=16000):
            pass
    assert unauthorized.value.status_code == 401
    # bad data gets Deepgram's Error message and close 1008, while another stream goes on untouched
    data, heard = int16(sounds(1.2, 78))
    want = [(w.text, round(w.start, 4), round(w.end, 4))
            for w in expected_words(reference.model, reference.outputs(heard))]

    async def good():
        messages = []
        async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=24000) as socket:
            for i in range(0, len(data), 2400):
                await socket.send_media(data[i:i + 2400])
                await asyncio.sleep(0.01)
            await socket.send_close_stream()
            async for message in socket:
                messages.append(message)
        return results_words(messages)

    async def bad():
        async with websockets.connect(keyed.ws + "/v1/listen?encoding=opus",
                                      additional_headers={"Authorization": f"Token {KEY}"}) as ws:
            await ws.send(b"not an ogg page at all")
            error = await ws.recv()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        return error, closed.value.rcvd.code

    words, (error, code) = await asyncio.gather(good(), bad())
    assert '"type":"Error"' in error and "DATA-0000" in error and code == 1008
    assert words == want
    async with websockets.connect(keyed.ws + "/v1/listen?encoding=linear16&sample_rate=16000",
                                  additional_headers={"Authorization": f"Token {KEY}"}) as ws:
        await ws.send('{"type": "Reconfigure"}')
        assert "DATA-0000" in await ws.recv()


async def test_livekit_deepgram_plugin(keyed, reference, sounds):
    import aiohttp
    from livekit import rtc
    from livekit.agents.stt import SpeechEventType
    from livekit.plugins import deepgram as lk_deepgram

    data, heard = int16(sounds(2.0, 73))
    want = [w.text for w in expected_words(reference.model, reference.outputs(heard))]
    async with aiohttp.ClientSession() as http:
        stt = lk_deepgram.STT(api_key=KEY, base_url=keyed.http + "/v1/listen", sample_rate=24000, language="en-US",
                              interim_results=True, http_session=http)
        stream = stt.stream()
        step = 2400 * 2
        for i in range(0, len(data), step):
            chunk = data[i:i + step]
            stream.push_frame(rtc.AudioFrame(data=chunk, sample_rate=24000, num_channels=1,
                                             samples_per_channel=len(chunk) // 2))
        stream.end_input()
        finals = []

        async def read():
            async for event in stream:
                if event.type == SpeechEventType.FINAL_TRANSCRIPT:
                    finals.append(event.alternatives[0].text)

        await asyncio.wait_for(read(), 120)
        await stream.aclose()
    # a final result per word, in order; the plugin's end_input sends Finalize, so the words not final by then
    # come together in its from_finalize result
    assert " ".join(finals) == " ".join(want)


def test_openai_file_parameters(keyed, reference, sounds, tmp_path):
    import io

    import openai
    import soundfile

    pcm = sounds(1.0, 74)
    path = tmp_path / "clip.wav"
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, 24000, format="WAV", subtype="FLOAT")
    path.write_bytes(buffer.getvalue())
    client = openai.OpenAI(base_url=keyed.http + "/v1", api_key=KEY, timeout=300)
    # the tiny checkpoint has stt-1b's timing: English and French
    french = client.audio.transcriptions.create(model="m", file=path.open("rb"), language="fr",
                                                response_format="verbose_json", temperature=0)
    assert french.language == "french"
    assert french.text == " ".join(w.text for w in expected_words(reference.model, reference.outputs(pcm)))
    # prompt (keyterms) and temperature (sampling) are honoured since issue 20: test_decoding_protocols.py
    refusals = {"language": dict(language="de"), "temperature": dict(temperature=2.5),
                "include": dict(include=["logprobs"]), "chunking_strategy": dict(chunking_strategy={"type": "server_vad"})}
    for param, kwargs in refusals.items():
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.transcriptions.create(model="m", file=path.open("rb"), **kwargs)
        assert refused.value.status_code == 400 and refused.value.body["param"] == param, param
    with pytest.raises(openai.BadRequestError) as translation:
        client.audio.translations.create(model="m", file=path.open("rb"))
    assert "translation is not supported" in translation.value.body["message"]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(openai.BadRequestError) as undecodable:
        client.audio.transcriptions.create(model="m", file=bad.open("rb"))
    assert "/tmp" not in undecodable.value.body["message"] and undecodable.value.body["param"] == "file"
    response = httpx.post(keyed.http + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {KEY}"},
                          data={"temperature": "warm"}, files={"file": ("a.wav", path.read_bytes())})
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


async def test_openai_realtime_transcription(keyed, reference, sounds):
    import base64

    import openai

    data, heard = int16(sounds(1.6, 75))
    want = [w.text for w in expected_words(reference.model, reference.outputs(heard))]
    client = openai.AsyncOpenAI(base_url=keyed.http + "/v1", api_key=KEY)
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        await connection.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "kyutai", "language": "en"},
            "turn_detection": {"type": "server_vad"}}}})
        assert (await connection.recv()).type == "session.updated"
        # bad input: an error event, and the session goes on
        await connection.session.update(session={"type": "transcription", "audio": {"input": {
            "transcription": {"language": "de"}}}})
        refused = await connection.recv()
        assert refused.type == "error" and refused.error.param == "session.audio.input.transcription.language"
        for i in range(0, len(data), 4800):
            await connection.input_audio_buffer.append(audio=base64.b64encode(data[i:i + 4800]).decode())
        await connection.input_audio_buffer.commit()
        deltas, completed, kinds, committed = {}, [], [], []
        async for event in connection:
            kinds.append(event.type)
            if event.type == "input_audio_buffer.committed":
                committed.append(event.item_id)
            elif event.type == "conversation.item.input_audio_transcription.delta":
                deltas[event.item_id] = deltas.get(event.item_id, "") + event.delta
            elif event.type == "conversation.item.input_audio_transcription.completed":
                completed.append(event.transcript)
                assert deltas.pop(event.item_id, "") == event.transcript  # the deltas spell the item's transcript
                if sum(len(t.split()) for t in completed) >= len(" ".join(want).split()):
                    break
    assert " ".join(completed) == " ".join(want)
    # the commit is answered at once, as OpenAI does, before its item's transcript: that item gets every delta of
    # the audio before the commit, also those that come after its committed
    assert committed and not deltas and kinds.index("input_audio_buffer.committed") < kinds.index(
        "conversation.item.input_audio_transcription.completed")


async def test_pipecat_deepgram_stt_service(keyed, reference, sounds):
    from pipecat.frames.frames import (
        InputAudioRawFrame,
        TranscriptionFrame,
        VADUserStoppedSpeakingFrame,
    )
    from pipecat.pipeline.task import PipelineParams
    from pipecat.services.deepgram.stt import DeepgramSTTService
    from pipecat.tests.utils import SleepFrame, run_test

    data, heard = int16(sounds(1.6, 76))
    want = [w.text for w in expected_words(reference.model, reference.outputs(heard))]  # as a stream that ends
    stt = DeepgramSTTService(api_key=KEY, base_url=keyed.http, sample_rate=24000)
    audio = [InputAudioRawFrame(audio=data[i:i + 4800], sample_rate=24000, num_channels=1)
             for i in range(0, len(data), 4800)]
    # the user stops speaking: Pipecat sends Finalize, and every word comes as a final transcription (those not
    # final before the Finalize together, in its from_finalize result)
    down, _ = await run_test(stt, frames_to_send=[*audio, VADUserStoppedSpeakingFrame(), SleepFrame(sleep=20)],
                             pipeline_params=PipelineParams(audio_in_sample_rate=24000), start_timeout=10)
    assert " ".join(f.text for f in down if isinstance(f, TranscriptionFrame)) == " ".join(want)


async def test_deepgram_mulaw_8k_and_utterance_end(keyed, reference, sounds):
    import io

    import soundfile

    from kyutai_stt.audio.resample import StreamResampler
    from kyutai_stt.audio.codecs import g711_decode

    source = sounds(2.4, 77)
    narrow = StreamResampler(24000, 8000)
    pcm8k = np.concatenate([narrow.feed(source), narrow.flush()])
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(pcm8k, -1, 1), 8000, format="RAW", subtype="ULAW")
    data = buffer.getvalue()
    wide = StreamResampler(8000)
    heard = np.concatenate([wide.feed(g711_decode(data, "mulaw")), wide.flush()])
    outputs = reference.outputs(heard)
    want = [w.text for w in expected_words(reference.model, outputs)]
    # the VAD head's ends of turn, as the turn layer finds them
    ends = len(turn_word_counts(reference, heard, keyed.app.state.service.settings.end_of_turn_threshold))
    messages = []
    async with deepgram_client(keyed).listen.v1.connect(
            model="nova-3", encoding="mulaw", sample_rate=8000, interim_results="true", utterance_end_ms=1000) as socket:
        for i in range(0, len(data), 800):
            await socket.send_media(data[i:i + 800])
        await socket.send_close_stream()
        async for message in socket:
            messages.append(message)
    assert [w.punctuated_word for m in messages if isinstance(m, ListenV1Results) and m.is_final
            for w in m.channel.alternatives[0].words] == want
    assert ends and sum(getattr(m, "type", "") == "UtteranceEnd" for m in messages) == ends
    # each UtteranceEnd's last_word_end is the end of the last final word before it (Deepgram's field)
    last = None
    for m in messages:
        if isinstance(m, ListenV1Results) and m.is_final and m.channel.alternatives[0].words:
            last = m.channel.alternatives[0].words[-1].end
        elif getattr(m, "type", "") == "UtteranceEnd":
            assert last is not None and m.last_word_end == pytest.approx(last, abs=1e-4)


async def test_deepgram_turn_ends_after_the_turns_last_word(keyed, reference, bria):
    """Real speech through deepgram-sdk with utterance_end_ms and vad_events: each turn's ``speech_final`` is on
    the final result of its last word and its ``UtteranceEnd`` comes right after, never before that word is final
    (the turn layer's ends, from the reference); the words and times stay the file's."""
    data, heard = int16(bria[:SAMPLE_RATE * 6])  # four turns with the tiny random checkpoint
    counts = turn_word_counts(reference, heard, keyed.app.state.service.settings.end_of_turn_threshold)
    want = [(w.text, round(w.start, 4), round(w.end, 4))
            for w in expected_words(reference.model, reference.outputs(heard))]
    messages = []
    async with deepgram_client(keyed).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=24000, interim_results="true", punctuate="true",
            vad_events="true", utterance_end_ms=1000) as socket:
        for i in range(0, len(data), 9600):
            await socket.send_media(data[i:i + 9600])
        await socket.send_close_stream()
        async for message in socket:
            messages.append(message)
    assert results_words(messages) == want
    finals, at_speech_final, at_utterance_end = 0, [], []
    for message in messages:
        if isinstance(message, ListenV1Results) and message.is_final:
            finals += len(message.channel.alternatives[0].words)
            if message.speech_final:
                at_speech_final.append(finals)
        elif getattr(message, "type", "") == "UtteranceEnd":
            at_utterance_end.append(finals)
    assert counts and at_speech_final == counts and at_utterance_end == counts


async def test_deepgram_sdk_prerecorded(keyed, reference, sounds):
    import io

    import soundfile

    pcm = sounds(1.5, 79)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, 24000, format="WAV", subtype="FLOAT")
    response = await deepgram_client(keyed).listen.v1.media.transcribe_file(
        request=buffer.getvalue(), model="nova-3", punctuate=True, language="en")
    words = response.results.channels[0].alternatives[0].words
    want = expected_words(reference.model, reference.outputs(pcm))
    assert [(w.punctuated_word, round(w.start, 4), round(w.end, 4)) for w in words] == \
        [(w.text, round(w.start, 4), round(w.end, 4)) for w in want]
    from deepgram.core.api_error import ApiError

    with pytest.raises(ApiError) as refused:
        await deepgram_client(keyed).listen.v1.media.transcribe_file(request=b"not audio", model="nova-3")
    assert refused.value.status_code == 400 and "/tmp" not in str(refused.value.body)


async def test_deepgram_container_audio(keyed, reference, sounds):
    """No encoding: container audio (here Ogg/Opus as a browser records it), decoded by FFmpeg as it comes."""
    from kyutai_stt.audio.decode import encode_ogg_opus
    from kyutai_stt.audio.codecs import ContainerStreamDecoder

    data = b"".join(encode_ogg_opus(sounds(1.5, 80)))
    decoder = ContainerStreamDecoder()
    heard = np.concatenate([decoder.feed(data), decoder.end()])
    want = [w.text for w in expected_words(reference.model, reference.outputs(heard))]
    messages = []
    async with deepgram_client(keyed).listen.v1.connect(model="nova-3") as socket:
        for i in range(0, len(data), 700):
            await socket.send_media(data[i:i + 700])
        await socket.send_close_stream()
        async for message in socket:
            messages.append(message)
    assert [w[0] for w in results_words(messages)] == want
