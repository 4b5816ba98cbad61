"""Codecs beyond Ogg/Opus: G.711 against the standard library's reference, containers pushed in pieces."""

from __future__ import annotations

import warnings
import numpy as np
import pytest

from kyutai_stt.audio.decode import AudioFormatError
from kyutai_stt.audio.codecs import ContainerStreamDecoder, decode_container, g711_decode

from .conftest import CASES

WEBM = CASES / "speech_en_48k.webm"


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_g711_matches_the_reference_expansion(law):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # the ITU tables as CPython shipped them (until 3.12)
    codes = bytes(range(256))
    expand = audioop.ulaw2lin if law == "mulaw" else audioop.alaw2lin
    want = np.frombuffer(expand(codes, 2), "<i2") / 32768.0
    got = g711_decode(codes, law)
    assert got.dtype == np.float32 and np.array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("piece", [1, 997, 1 << 20])
def test_webm_opus_in_pieces_equals_the_whole_file(piece):
    data = WEBM.read_bytes()
    whole = decode_container(str(WEBM))
    assert abs(len(whole) / 24000 - 4.16) < 0.1  # the case's length (ffprobe)
    decoder = ContainerStreamDecoder("webm")
    outs = [decoder.feed(data[i:i + piece]) for i in range(0, len(data), piece)] + [decoder.end()]
    got = np.concatenate(outs)
    assert got.shape == whole.shape and np.abs(got - whole).max() < 1e-4
    if piece < len(data):
        assert sum(len(o) for o in outs[:-1]) > len(whole) // 2  # audio comes out while the stream arrives


@pytest.mark.parametrize("fmt", ["webm", "ogg", None])
def test_garbage_container_is_a_clear_error(fmt):
    decoder = ContainerStreamDecoder(fmt)
    with pytest.raises(AudioFormatError) as info:
        decoder.feed(b"not audio at all " * 500)
        decoder.end()
    message = str(info.value)
    assert "could not decode the stream as" in message and "/" not in message and "Errno" not in message
