"""The reply's ids equal the tokenizer's for the whole text however it streams, and released text is
exactly the text of the released ids."""

from __future__ import annotations

import random

import pytest

from processor.gateway.reply import Reply, ReplyTokenizer
from processor.model.tokenizer import content_token_ids

TEXTS = [
    "Sure! Here is how to bake bread:\n\n1. Mix flour and water.\n2. Knead  it well.  ",
    "naïve café — 東京 🍞🥖 emoji split across tokens",
    "\n\nleading newlines are dropped as the template drops them",
    "<|im_end|> stays text, as do  spaces\t\tand tabs\n \n",
]


@pytest.fixture(scope="module")
def reply_tokenizer(qwen3_tokenizer) -> ReplyTokenizer:
    return ReplyTokenizer(qwen3_tokenizer)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("seed", range(5))
def test_streamed_reply_ids_and_released_text_match_the_whole_text(
    reply_tokenizer: ReplyTokenizer, qwen3_tokenizer, text: str, seed: int
) -> None:
    rng = random.Random(seed)
    reply = Reply(reply_tokenizer)
    cuts = sorted(rng.sample(range(1, len(text)), k=min(8, len(text) - 1)))
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        reply.feed(text[start:end])
    reply.finish()
    content = text.lstrip("\n")
    assert reply.token_ids == content_token_ids(qwen3_tokenizer, content)
    released = ""
    position = 0
    while position < len(reply.token_ids):
        position = min(len(reply.token_ids), position + rng.randint(1, 3))
        piece = reply.release(position)
        assert "\ufffd" not in piece  # a character split over tokens waits for its last byte
        released += piece
        assert content.startswith(released)
    assert released == content
