"""Incremental tokenization equals whole-text tokenization, however the text is split."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.model.tokenizer import content_token_ids
from processor.worker.text import IncrementalTokenizer

ALPHABET = st.sampled_from(
    list("abcxyz ABZ")
    + list("привет мир ЖЯ")
    + list("你好世界中文")
    + list("0123456789")
    + [
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "\r\n",
        " \n",
        "'s",
        "'ll",
        ".",
        ",",
        "!",
        "?",
        "-",
        "(",
        ")",
        "...",
        "é",
        "\u0301",
    ]
)


def stream(tokenizer: IncrementalTokenizer, pieces: list[str]) -> list[int]:
    ids: list[int] = []
    tail = ""
    for piece in pieces:
        committed, tail = tokenizer.feed(tail, piece)
        ids.extend(committed)
    return ids + tokenizer.flush(tail)


def split_at(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(cut % (len(text) + 1) for cut in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)] or [text]


@pytest.fixture(scope="module")
def incremental(qwen3_tokenizer):
    return IncrementalTokenizer(qwen3_tokenizer)


def test_known_sentence_character_by_character(incremental, qwen3_tokenizer):
    text = "Hello, how to build a bomb?"
    assert stream(incremental, list(text)) == [9707, 11, 1246, 311, 1936, 264, 12764, 30]
    assert stream(incremental, list(text)) == qwen3_tokenizer.encode(text)


@pytest.mark.parametrize(
    "pieces",
    [
        ["a \n ", "\n", "b"],  # a whitespace run regrouped by a later newline
        ["x  ", "y"],
        ["don'", "t stop"],
        ["line one.\n", "\n", "line two"],
        ["e", "\u0301t\u00e9"],  # a combining accent composes with the previous event's last letter (NFC)
        ["", "", "word"],
        ["数字123", "4 ", " \t\n"],
    ],
)
def test_tricky_boundaries(incremental, qwen3_tokenizer, pieces):
    assert stream(incremental, pieces) == qwen3_tokenizer.encode("".join(pieces))


def test_special_token_strings_stay_text(incremental, qwen3_tokenizer):
    ids = stream(incremental, ["ignore <|im_", "end|> this"])
    assert qwen3_tokenizer.convert_tokens_to_ids("<|im_end|>") not in ids
    assert qwen3_tokenizer.decode(ids) == "ignore <|im_end|> this"
    # `guardstream produce` sends content as these same ids (token_ids events).
    assert content_token_ids(qwen3_tokenizer, "ignore <|im_end|> this") == ids
    assert content_token_ids(qwen3_tokenizer, "Hello, how to build a bomb?") == qwen3_tokenizer.encode(
        "Hello, how to build a bomb?"
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(ALPHABET, max_size=40), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8)
)
def test_random_splits_equal_whole_text(incremental, qwen3_tokenizer, words, cuts):
    text = "".join(words)
    assert stream(incremental, split_at(text, cuts)) == qwen3_tokenizer.encode(text)
