"""Real-world inputs (tests/cases, README there): containers and codecs people send, times kept through decoding
and at the end of the audio, stereo files. Real server, real clients, words compared with the reference."""

from __future__ import annotations

import io
import json

import av
import httpx
import numpy as np
import soundfile
import websockets

from kyutai_stt.audio.decode import load_audio_file
from kyutai_stt.audio.resample import resample
from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.audio.codecs import g711_decode, decode_container
from kyutai_stt.stream.formats import to_srt

from .conftest import CASES
from .helpers import expected_words


async def stream(url: str, pieces: list[bytes]) -> tuple[list[dict], int | None, str]:
    async with websockets.connect(url) as ws:
        for piece in pieces:
            await ws.send(piece)
        await ws.send(json.dumps({"type": "end"}))
        events = [json.loads(m) async for m in ws]
    return events, ws.close_code, ws.close_reason


def words(events: list[dict]) -> list[tuple[str, float]]:
    return [(e["text"], e["start_time"]) for e in events if e["type"] == "word"]


def want(reference, pcm: np.ndarray) -> list[tuple[str, float]]:
    return [(w.text, w.start) for w in expected_words(reference.model, reference.outputs(pcm))]


def encode(pcm: np.ndarray, container: str, codec: str, rate: int = SAMPLE_RATE, layout: str = "mono") -> bytes:
    """``pcm`` ([channels, samples] float32 at ``rate``) encoded with FFmpeg's own encoders, as a phone or browser
    would send it."""
    pcm = np.atleast_2d(pcm).astype(np.float32)
    out = io.BytesIO()
    with av.open(out, "w", format=container) as box:
        stream = box.add_stream(codec, rate=rate, layout=layout)
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, pcm.shape[1], frame_size):
            chunk = np.ascontiguousarray(pcm[:, start:start + frame_size])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)
    return out.getvalue()


async def test_webm_opus_streamed_and_uploaded_like_a_browser_records_it(server, reference):
    """Chrome's MediaRecorder output (WebM/Opus, 48 kHz): streamed in pieces on /v1/stream?format=webm and
    uploaded to both file endpoints, it is transcribed as the decoded audio."""
    data = (CASES / "speech_en_48k.webm").read_bytes()
    pcm = decode_container(str(CASES / "speech_en_48k.webm"))
    events, code, _ = await stream(server.ws + "/v1/stream?format=webm", [data[i:i + 700] for i in range(0, len(data), 700)])
    assert code == 1000 and events[-1]["type"] == "end"
    assert words(events) == want(reference, pcm) and words(events)
    async with httpx.AsyncClient(timeout=120) as http:
        kyutai = await http.post(server.http + "/api/asr-streaming", content=data)
        openai = await http.post(server.http + "/v1/audio/transcriptions", files={"file": ("rec.webm", data)},
                                 data={"response_format": "verbose_json", "timestamp_granularities[]": "word"})
    assert kyutai.status_code == 200 and openai.status_code == 200
    assert [(m["text"], m["start_time"]) for m in kyutai.json() if m["type"] == "Word"] == want(reference, pcm)
    assert abs(openai.json()["duration"] - len(pcm) / SAMPLE_RATE) < 1e-3


async def test_m4a_aac_and_mp3_uploads(server, reference, speech):
    """Files as phones (m4a/AAC) and everyone else (mp3) save them are transcribed as their decoded audio."""
    clip = speech[: 3 * SAMPLE_RATE]
    async with httpx.AsyncClient(timeout=120) as http:
        for name, container, codec in (("memo.m4a", "mp4", "aac"), ("clip.mp3", "mp3", "libmp3lame")):
            data = encode(resample(clip, SAMPLE_RATE, 44100), container, codec, 44100)
            pcm = _decoded(data, name)
            response = await http.post(server.http + "/v1/audio/transcriptions", files={"file": (name, data)},
                                       data={"response_format": "verbose_json", "timestamp_granularities[]": "word"})
            assert response.status_code == 200, (name, response.text)
            body = response.json()
            assert [(w["word"], w["start"]) for w in body["words"]] == want(reference, pcm), name
            assert abs(body["duration"] - len(clip) / SAMPLE_RATE) < 0.1, name


def _decoded(data: bytes, name: str) -> np.ndarray:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        return load_audio_file(path)


async def test_g711_streams_at_8_khz(server, reference, speech):
    """Telephony audio: raw mu-law and A-law at 8 kHz, streamed in 20 ms packets, transcribed as the decoded
    audio resampled to 24 kHz (no time shift)."""
    clip8k = resample(speech[: 3 * SAMPLE_RATE], SAMPLE_RATE, 8000)
    for law, encode_law in (("mulaw", "pcm_mulaw"), ("alaw", "pcm_alaw")):
        codes = _g711_encode(clip8k, encode_law)
        heard = resample(g711_decode(codes, law), 8000)
        events, code, _ = await stream(server.ws + f"/v1/stream?format={law}&sample_rate=8000",
                                       [codes[i:i + 160] for i in range(0, len(codes), 160)])
        assert code == 1000 and events[-1]["type"] == "end", law
        assert words(events) == want(reference, heard) and words(events), law
        assert abs(events[-1]["duration"] - len(codes) / 8000) < 1e-3


def _g711_encode(pcm: np.ndarray, codec: str) -> bytes:
    """G.711 bytes from FFmpeg's encoder (the reference the telephony world uses)."""
    context = av.CodecContext.create(codec, "w")
    context.sample_rate, context.layout, context.format = 8000, "mono", "s16"
    frame = av.AudioFrame.from_ndarray((np.clip(pcm, -1, 1) * 32767).astype(np.int16)[None], format="s16",
                                       layout="mono")
    frame.sample_rate = 8000
    return b"".join(bytes(p) for p in [*context.encode(frame), *context.encode(None)])


async def test_uploads_at_other_rates_keep_their_times(server, reference):
    """burst_8000.wav (tone bursts at known times, 8 kHz): uploaded, it decodes to the bursts at the same times
    (no resampler delay) and is transcribed exactly as when streamed at 8 kHz."""
    pcm8k, rate = soundfile.read(str(CASES / "burst_8000.wav"), dtype="int16")
    assert rate == 8000
    decoded = load_audio_file(CASES / "burst_8000.wav")
    onset8k = int(np.argmax(np.abs(pcm8k) > 3000))
    onset24k = int(np.argmax(np.abs(decoded) > 3000 / 32768))
    assert abs(onset24k - 3 * onset8k) <= 3  # sphn's resampler put it 64 ms (1536 samples) late
    assert len(decoded) == 3 * len(pcm8k)
    data = (CASES / "burst_8000.wav").read_bytes()
    streamed, code, _ = await stream(server.ws + "/v1/stream?format=pcm_s16le&sample_rate=8000",
                                     [pcm8k[i:i + 1600].tobytes() for i in range(0, len(pcm8k), 1600)])
    async with httpx.AsyncClient(timeout=120) as http:
        upload = await http.post(server.http + "/api/asr-streaming", content=data)
    assert code == 1000 and upload.status_code == 200
    uploaded = [(m["text"], m["start_time"]) for m in upload.json() if m["type"] == "Word"]
    assert uploaded == words(streamed) == want(reference, decoded)


async def test_nothing_ends_after_the_audio(server, reference):
    """short_50ms.wav: the last word, segment and cue end by the end of the 50 ms the client sent (the flush
    silence after it is not audio), and the duration is 50 ms; streamed, the last word_end too."""
    data = (CASES / "short_50ms.wav").read_bytes()
    pcm = load_audio_file(CASES / "short_50ms.wav")
    duration = len(pcm) / SAMPLE_RATE
    async with httpx.AsyncClient(timeout=120) as http:
        verbose = (await http.post(server.http + "/v1/audio/transcriptions", files={"file": ("s.wav", data)},
                                   data={"response_format": "verbose_json", "timestamp_granularities[]": "word"})).json()
        srt = (await http.post(server.http + "/v1/audio/transcriptions", files={"file": ("s.wav", data)},
                               data={"response_format": "srt"})).text
    f32 = pcm.astype("<f4").tobytes()
    events, code, _ = await stream(server.ws + "/v1/stream?format=pcm_f32le", [f32])
    assert abs(verbose["duration"] - 0.05) < 1e-3 and events[-1]["duration"] == duration
    assert verbose["words"], "the random model says something here; without words this test checks nothing"
    assert max(w["end"] for w in verbose["words"]) <= duration
    assert max(s["end"] for s in verbose["segments"]) <= duration
    assert all(e["stop_time"] <= duration for e in events if e["type"] == "word_end")
    assert all(e["start_time"] <= duration for e in events if e["type"] == "word")
    ends = [line.split(" --> ")[1] for line in srt.splitlines() if " --> " in line]
    assert ends and max(ends) <= "00:00:00,050"


async def test_stereo_files_are_mixed_down(server, reference, speech):
    """A stereo WAV (speech left, silence right) is the mean of its channels, not interleaved samples read as
    mono (which would double its length)."""
    clip = speech[: 2 * SAMPLE_RATE]
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([clip, np.zeros_like(clip)], axis=1), SAMPLE_RATE, format="WAV", subtype="FLOAT")
    decoded = load_audio_file_from(buffer.getvalue())
    assert len(decoded) == len(clip) and np.abs(decoded - clip / 2).max() < 1e-6
    async with httpx.AsyncClient(timeout=120) as http:
        body = (await http.post(server.http + "/v1/audio/transcriptions", files={"file": ("st.wav", buffer.getvalue())},
                                data={"response_format": "verbose_json", "timestamp_granularities[]": "word"})).json()
    assert abs(body["duration"] - 2.0) < 1e-3
    assert [(w["word"], w["start"]) for w in body["words"]] == want(reference, decoded)


def load_audio_file_from(data: bytes) -> np.ndarray:
    from kyutai_stt.audio.decode import load_audio_bytes

    return load_audio_bytes(data, ".wav")


ADJACENT = [(f"w{i}", round(0.1 * i, 3), round(0.1 * i + 0.05, 3)) for i in range(14)]  # 50 ms words, 50 ms apart


def _check_cues(cue_list: list[tuple[float, float]], duration: float) -> None:
    assert len(cue_list) == 2  # 12 words, then the rest
    for (start, end), (next_start, _) in zip(cue_list, cue_list[1:]):
        assert start <= end <= next_start  # stretched to the minimum length, it used to run 0.2 s into the next
    assert cue_list[-1][1] <= duration


def test_cues_of_adjacent_short_words_never_overlap():
    from kyutai_stt.stream.formats import cue_times
    from kyutai_stt.stream.words import TimedWord

    words = [TimedWord(*w) for w in ADJACENT]
    _check_cues([(start, end) for start, end, _ in cue_times(words, duration=1.4)], 1.4)
    assert "00:00:01,100 --> 00:00:01,200" not in to_srt(words)  # the first cue ends where the second starts
    assert "00:00:00,000 --> 00:00:01,200" in to_srt(words) and "00:00:01,200 --> 00:00:01,600" in to_srt(words)
    assert "00:00:01,200 --> 00:00:01,400" in to_srt(words, 1.4)


def test_page_cues_match_the_server_and_never_overlap(tmp_path):
    """The page's formats.js, run by node: same SRT/VTT as formats.py for the same words."""
    import shutil
    import subprocess
    from pathlib import Path

    from kyutai_stt.stream.formats import to_vtt
    from kyutai_stt.stream.words import TimedWord

    node = shutil.which("node")
    if node is None:
        import pytest

        pytest.skip("node is not installed")
    module = tmp_path / "formats.mjs"  # an ES module, whatever package.json says
    module.write_text((Path(__file__).resolve().parents[1] / "kyutai_stt" / "serve" / "static" / "formats.js").read_text())
    words = [{"text": t, "start": s, "end": e, "turn": 0} for t, s, e in ADJACENT]
    script = (f"import {{toSrt, toVtt}} from {json.dumps(str(module))};\n"
              f"const w = {json.dumps(words)};\n"
              "console.log(JSON.stringify([toSrt(w), toVtt(w), toSrt(w, 1.4)]));")
    out = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    srt, vtt, capped = json.loads(out.stdout)
    timed = [TimedWord(*w) for w in ADJACENT]
    assert (srt, vtt, capped) == (to_srt(timed), to_vtt(timed), to_srt(timed, 1.4))
