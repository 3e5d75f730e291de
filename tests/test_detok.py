"""Incremental detokenisation streams UTF-8 text correctly, including Chinese split across byte-level tokens."""

from __future__ import annotations

import pytest

from llmsample.detok import IncrementalDetokenizer, StopMatcher

TEXTS = [
    "明天会下雨吗？公园里的花开了。",
    "Hello world! Mixed 中文 and English, emoji 🎉 too.",
    "  leading spaces and\nnew lines\n\n",
]


def stream(tokenizer, prompt: str, text: str) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer(prompt).input_ids)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_pieces_are_whole_characters(tiny_lm, text):
    _, tok = tiny_lm
    pieces = stream(tok, "The quick", text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)  # never half a multibyte character
    if any(ord(ch) > 0x2E80 for ch in text):
        assert "" in pieces[:-1]  # some character really was split across tokens and held back


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tiny_lm):
    _, tok = tiny_lm
    detok = IncrementalDetokenizer(tok, [])
    first_byte_token = tok.convert_tokens_to_ids(tok.tokenize("天")[0])
    assert detok.add(first_byte_token) == ""
    assert detok.flush() == "\ufffd"


@pytest.mark.parametrize(
    "stops, chunks, expected, stopped",
    [
        (["END"], ["abc E", "N", "D more"], ["abc ", "", ""], True),
        (["END"], ["abc E", "N", "X"], ["abc ", "", "ENX"], False),
        (["\n\n", "。"], ["第一句", "。第二"], ["第一句", ""], True),
        ([], ["a", "b"], ["a", "b"], False),
        # No stop before the first non-whitespace text: a run that opens with the stop string goes on.
        (["\n\n"], ["\n\n", " \n", "Hi", "\n\n"], ["\n\n", " \n", "Hi", ""], True),
        (["\n\n"], ["\n\nHi\n\nmore"], ["\n\nHi"], True),
        (["\nQ:"], ["\nQ: x"], ["\nQ: x"], False),  # the stop would begin before the text: no match there
    ],
)
def test_stop_matcher_holds_back_possible_prefixes(stops, chunks, expected, stopped):
    matcher = StopMatcher(stops)
    out, hit = [], False
    for chunk in chunks:
        text, hit = matcher.feed(chunk)
        out.append(text)
        if hit:
            break
    assert out == expected and hit == stopped


def test_control_tokens_that_are_not_marked_special_are_never_text(tmp_path):
    """Gemma 3's GGUF leaves <start_of_image> unmarked: the text skips it, the ids keep it; HTML tags are text."""
    from tiny_model import _tiny_tokenizer

    from llmsample.token_text import control_token_ids, decode_text

    tok = _tiny_tokenizer(tmp_path)
    tok.add_tokens(["<start_of_image>", "<unused7>", "[multimodal]", "<table>", "<h1>"])
    hidden = control_token_ids(tok)
    ids = {text: tok.convert_tokens_to_ids(text) for text in ("<start_of_image>", "<unused7>", "[multimodal]",
                                                                "<table>", "<h1>")}
    assert hidden == {ids["<start_of_image>"], ids["<unused7>"], ids["[multimodal]"]}
    hi = tok.encode("Hi", add_special_tokens=False)
    stream = [*hi, ids["<start_of_image>"], ids["<table>"], ids["[multimodal]"]]
    detok = IncrementalDetokenizer(tok, [], hidden)
    assert "".join(detok.add(i) for i in stream) + detok.flush() == "Hi<table>"
    assert decode_text(tok, stream) == "Hi<table>"
