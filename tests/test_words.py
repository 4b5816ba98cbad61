"""Word assembly is a pure function of the token stream: tested on hand-written sequences."""

from kyutai_stt.messages.events import Text, Word, WordEnd
from kyutai_stt.stream.words import TimedWord, WordAssembler, pair_words

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


def kyutai_server_words(tokens, delay=0):
    """Word/EndWord as Kyutai's server sends them: ``State::step_tokens`` in rust/moshi-core/src/asr.rs
    (kyutai-labs/moshi), rewritten here step by step as the specification: a token 3 or 0 after pieces sends the
    pieces as a Word (start: the time of the last boundary); a 0 sends EndWord (its own time) if a word is open."""
    out, word, unended, last_stop = [], [], False, 0.0
    for step, token in enumerate(tokens):
        if token in (3, 0):
            if word:
                out.append(("Word", "".join(PIECES[t] for t in word).replace("▁", " ").strip(), last_stop))
                word, unended = [], True
        else:
            word.append(token)
        if token == 0:
            stop = max(0.0, (step - delay) / 12.5)
            if unended:
                out.append(("EndWord", stop))
                unended = False
            last_stop = stop
    return out


def ours(tokens):
    assembler = WordAssembler(PIECES.__getitem__, 0)
    out = []
    for frame, token in enumerate(tokens):
        for event in assembler.feed(frame, token):
            if isinstance(event, Word):
                out.append(("Word", event.text, event.start_time))
            elif isinstance(event, WordEnd):
                out.append(("EndWord", event.stop_time))
    return out


def test_words_as_kyutai_server_delimits_them():
    """Hand-written sequences, each word opened by its boundary: the same Word/EndWord messages, in the same
    order and at the same times, as Kyutai's server. Padding ends a word there (pieces split by padding are two
    words), a boundary ends it too, and EndWord comes at the next boundary."""
    cases = [
        [0, 10, 11, 3, 3, 0, 12, 3, 0],            # "hello", then "world"
        [0, 10, 3, 3, 11, 3, 0, 12, 3, 0],         # padding between pieces: Kyutai's server sends "hel", "lo"
        [0, 10, 11, 0, 12, 14, 0, 3, 3],           # words ended by the next boundary, no padding
        [3, 3, 0, 13, 3, 3, 3, 3, 0, 12, 11, 3, 0],
    ]
    for tokens in cases:
        got, want = ours(tokens), kyutai_server_words(tokens)
        assert [m for m in got if m[0] == "EndWord"] == [m for m in want if m[0] == "EndWord"], tokens
        assert [m[:2] for m in got] == [m[:2] for m in want], tokens
        # start times: equal whenever the word's pieces come right after its boundary (Kyutai's server gives a
        # word with no boundary of its own the previous boundary's time; we give its first piece's)
        assert [m[2] for m in got if m[0] == "Word"][:1] == [m[2] for m in want if m[0] == "Word"][:1], tokens
    assert [m[1] for m in ours(cases[1]) if m[0] == "Word"] == ["hel", "lo", "world"]


def test_nothing_is_timed_after_the_end_of_the_audio():
    """Once the session knows where the client's audio ends, the flush after it adds no time: the last word ends
    at the end of the audio, not at the end of the flush."""
    assembler = WordAssembler(PIECES.__getitem__, 0)
    assembler.audio_end = 0.3
    events = []
    for frame, token in enumerate([0, 10, 11, 3, 3, 3, 3, 3, 3, 0, 12, 3, 3]):
        events += assembler.feed(frame, token)
    events += assembler.finish(13)
    words = pair_words(events)
    assert [(w.text, w.start, w.end) for w in words] == [("hello", 0.0, 0.3), ("world", 0.3, 0.3)]
    assert all(e.time <= 0.3 for e in events if isinstance(e, Text))


def test_byte_fallback_pieces_decode_as_the_tokenizer_does():
    """A byte-fallback piece is one byte, and a character's bytes may span pieces (never the literal "<0xC3>")."""
    pieces = {10: "▁caf", 11: "<0xC3>", 12: "<0xA9>", 13: "▁a", 14: "<0xAA>", 15: "<0xE2>", 16: "<0x82>", 17: "b"}
    assembler = WordAssembler(pieces.__getitem__, 0)
    events = []
    for frame, token in enumerate([0, 10, 11, 12, 0, 13, 14, 15, 16, 17, 3]):
        events += assembler.feed(frame, token)
    assert [e.text for e in events if isinstance(e, Word)] == ["café", "a\ufffd\ufffd\ufffdb"]
    # Text events carry whole characters: the first byte of "é" waits for the second
    assert [e.text for e in events if isinstance(e, Text)][:2] == [" caf", "é"]
    assert "".join(e.text for e in events if isinstance(e, Text)) == " café a\ufffd\ufffd\ufffdb"
