"""Words are what the tokenizer decodes, byte-fallback pieces included, through the server's protocols.

Kyutai's tokenizers have sentencepiece's byte fallback: a character outside the vocabulary comes as byte pieces
``<0xNN>``, which once reached clients as that literal text (jitsi/jigasi#553). Here the tiny checkpoint's weights
get a tokenizer trained (in a second) on accented and kana words with ``byte_fallback`` (ids 4-259 are the byte
pieces, so the random LM emits some, next to non-ASCII pieces), and every word through ``/v1/stream`` and
moshi-server's HTTP endpoint must equal ``tokenizer.decode`` of its pieces.
"""

from __future__ import annotations

import io
import random
import shutil

import httpx
import pytest
import sentencepiece

from kyutai_stt.client import Client
from kyutai_stt.engine.kyutai.info import BOUNDARY_TOKEN, FIRST_PIECE_TOKEN, PADDING_TOKEN
from kyutai_stt.messages.events import Word

from .conftest import start_server
from .test_protocols import wav_bytes


def train_tokenizer(vocab_size: int) -> bytes:
    """BPE with byte fallback and Kyutai's special ids, on made-up French-like and kana words."""
    rng = random.Random(5)
    syllables = [c + v for c in "bdlmnrst" for v in "aeiou"]
    accents = "é è ê à â ç ô û ù ï ë œ æ".split()
    kana = "あ い う え お か き く け こ さ し す せ そ た ち つ て と な に ぬ ね の".split()
    rare = "ß ø å ñ ğ ş ł ž č ř ő ű 漢 字 語 🙂 🎧 €".split()  # too rare for pieces of their own: bytes

    def word() -> str:
        w = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.5:
            w += rng.choice(accents)
        if rng.random() < 0.2:
            w = "".join(rng.choice(kana) for _ in range(rng.randint(2, 4)))
        if rng.random() < 0.03:
            w += rng.choice(rare)
        return w

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(word() for _ in range(10)) for _ in range(5000)), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=0.98,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def byte_checkpoint(checkpoint_dir, tmp_path_factory):
    """The tiny checkpoint (same weights, so the same tokens) with a byte-fallback tokenizer of the same size."""
    folder = tmp_path_factory.mktemp("bytes") / "tiny-bytes"
    folder.mkdir()
    for item in checkpoint_dir.iterdir():
        if item.name != "tokenizer.model":
            (folder / item.name).symlink_to(item.resolve()) if item.suffix == ".safetensors" \
                else shutil.copy(item, folder / item.name)
    size = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint_dir / "tokenizer.model")).get_piece_size()
    (folder / "tokenizer.model").write_bytes(train_tokenizer(size))
    return folder


def decoded_words(tokenizer, tokens: list[int]) -> list[str]:
    """Kyutai's word rule on the token stream (the pieces since the last padding or boundary form a word), each
    word's text being what the tokenizer decodes of its pieces."""
    words, pieces = [], []
    for token in tokens + [PADDING_TOKEN]:
        if token >= FIRST_PIECE_TOKEN:
            pieces.append(token)
        elif token in (PADDING_TOKEN, BOUNDARY_TOKEN) and pieces:
            words.append(tokenizer.decode(pieces).strip())
            pieces = []
    return [w for w in words if w]


async def test_words_are_the_tokenizers_decoding_of_byte_pieces(byte_checkpoint, reference, sounds):
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(byte_checkpoint / "tokenizer.model"))
    pcm = sounds(3.0, 5)
    tokens = reference.tokens(pcm)  # the tiny weights' tokens: the tokenizer does not change them
    assert any(tokenizer.is_byte(t) for t in tokens if t >= FIRST_PIECE_TOKEN), "no byte piece: the test proves nothing"
    want = decoded_words(tokenizer, tokens)
    assert want and not any("<0x" in w for w in want)
    assert any(any(ord(c) > 127 for c in w) for w in want)
    with start_server(byte_checkpoint) as server:
        events = [e async for e in Client(server.ws, "events").stream(pcm)]
        assert [e.text for e in events if isinstance(e, Word)] == want
        async with httpx.AsyncClient(timeout=300) as client:
            response = await client.post(server.http + "/api/asr-streaming", content=wav_bytes(pcm))
        assert [m["text"] for m in response.json() if m["type"] == "Word"] == want
