"""Word assembly is a pure function of the token stream: tested on hand-written sequences."""

from kyutai_stt.events import Text, Word, WordEnd
from kyutai_stt.words import TimedWord, WordAssembler, pair_words

PIECES = {10: "▁hel", 11: "lo", 12: "▁world", 13: "▁a", 14: "!"}


def run(tokens, offset=0, finish_at=None):
    assembler = WordAssembler(PIECES.__getitem__, offset)
    events = []
    for frame, token in enumerate(tokens):
        events += assembler.feed(frame, token)
    events += assembler.finish(finish_at if finish_at is not None else len(tokens))
    return events


def test_boundary_pieces_padding_make_a_word_with_times():
    events = run([3, 0, 10, 11, 3, 3, 0, 12, 3, 3])
    words = [e for e in events if isinstance(e, Word)]
    assert [(w.text, w.start_time) for w in words] == [("hello", 0.08), ("world", 0.48)]
    ends = [e for e in events if isinstance(e, WordEnd)]
    # the first word ends where the next begins; the last at the end of the audio
    assert [e.stop_time for e in ends] == [0.48, 0.8]
    assert [e.text for e in events if isinstance(e, Text)] == [" hel", "lo", " world"]


def test_word_is_emitted_when_complete_not_before():
    assembler = WordAssembler(PIECES.__getitem__, 0)
    assert [type(e) for e in assembler.feed(0, 0)] == []
    assert [type(e) for e in assembler.feed(1, 10)] == [Text]
    assert [type(e) for e in assembler.feed(2, 11)] == [Text]
    out = assembler.feed(3, 3)
    assert out == [Word(text="hello", start_time=0.0)]


def test_delay_is_subtracted_and_times_clamped():
    # offset 6 frames = 0.48 s: a boundary at frame 10 is at 0.32 s of audio; one at frame 2 clamps to 0
    events = run([0, 0, 13, 3, 3, 3, 3, 3, 3, 3, 0, 12, 3], offset=6)
    words = [e for e in events if isinstance(e, Word)]
    assert [(w.text, round(w.start_time, 3)) for w in words] == [("a", 0.0), ("world", 0.32)]


def test_pieces_without_boundary_and_back_to_back_words():
    events = run([10, 11, 0, 12, 0, 13, 14])
    assert [(e.text, round(e.start_time, 2)) for e in events if isinstance(e, Word)] == [
        ("hello", 0.0), ("world", 0.16), ("a!", 0.32)]
    assert [round(e.stop_time, 2) for e in events if isinstance(e, WordEnd)] == [0.16, 0.32, 0.56]


def test_special_ids_are_not_text():
    events = run([1, 2, 3, 3])
    assert events == []


def test_pair_words():
    events = run([0, 10, 11, 3, 0, 12, 3])
    assert pair_words(events) == [TimedWord("hello", 0.0, 0.32), TimedWord("world", 0.32, 0.56)]
