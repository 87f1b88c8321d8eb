"""The offline Qwen3 tokenizer: ids, agreement with tiktoken, the chat template, loading from a folder."""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from processor.model.tokenizer import (
    QWEN3_ADDED_TOKENS,
    load_tokenizer,
    qwen3_tiktoken_encoding,
    special_token_ids,
)

# Qwen3 tokenizer facts, as the published checkpoints' tokenizer.json has them.
NOTES_TEXT = "Hello, how to build a bomb?"
NOTES_TEXT_IDS = [9707, 11, 1246, 311, 1936, 264, 12764, 30]
IM_START, IM_END, ENDOFTEXT, THINK, END_THINK = 151644, 151645, 151643, 151667, 151668
USER, ASSISTANT, NEWLINE, DOUBLE_NEWLINE = 872, 77091, 198, 271
REFUSAL = "I can't help."
NOTES_CONVERSATION = [
    {"role": "user", "content": NOTES_TEXT},
    {"role": "assistant", "content": REFUSAL},
]
NOTES_RENDERING = (
    f"<|im_start|>user\n{NOTES_TEXT}<|im_end|>\n"
    f"<|im_start|>assistant\n<think>\n\n</think>\n\n{REFUSAL}<|im_end|>\n"
)

# Text alphabets the guard sees: English, Cyrillic, Chinese, digits, punctuation, every kind of
# whitespace, and a combining accent so NFC normalization matters.
MIXED_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"
    "你好世界的是不了人我在有他这中大来上个国说们为子和地出道也时年"
    "0123456789"
    ".,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|"
    " \n\t\r\u00a0\u3000"
    "\u0301é"
)
MIXED_WORDS = [
    "Hello",
    " world",
    "Привет",
    " мир",
    "你好",
    "世界",
    " 12345",
    "'s",
    "'ll",
    "\n\n",
    "  ",
    "e\u0301",
    "<|im_end|>",
    "<think>",
]


@pytest.fixture(scope="module")
def tiktoken_reference():
    return qwen3_tiktoken_encoding()


def reference_ids(encoding, text: str) -> list[int]:
    # tiktoken does not normalize; the Qwen3 tokenizer applies NFC first. Like every HF tokenizer it also
    # reads added-token text ("<|im_end|>", "<think>") inside content as that one token.
    return encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")


def chat_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict], **kwargs) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(encoded["input_ids"])


def test_special_token_ids_match_qwen3(qwen3_tokenizer):
    ids = special_token_ids(qwen3_tokenizer)
    assert (ids.im_start, ids.im_end, ids.endoftext) == (IM_START, IM_END, ENDOFTEXT)
    assert (ids.think, ids.end_think) == (THINK, END_THINK)
    assert (ids.user, ids.assistant) == (USER, ASSISTANT)
    assert (ids.newline, ids.double_newline) == (NEWLINE, DOUBLE_NEWLINE)


def test_added_tokens_follow_the_vocabulary_in_qwen3_order(qwen3_tokenizer):
    first_added_id = 151643
    for offset, (token, _) in enumerate(QWEN3_ADDED_TOKENS):
        assert qwen3_tokenizer.convert_tokens_to_ids(token) == first_added_id + offset
    assert len(qwen3_tokenizer) == first_added_id + len(QWEN3_ADDED_TOKENS) == END_THINK + 1
    assert qwen3_tokenizer.eos_token == "<|im_end|>"
    assert qwen3_tokenizer.pad_token == "<|endoftext|>"


def test_skip_special_tokens_keeps_think_markers_as_qwen3_does(qwen3_tokenizer):
    ids = [IM_START, USER, NEWLINE, THINK, *NOTES_TEXT_IDS, END_THINK, IM_END]
    assert qwen3_tokenizer.decode(ids, skip_special_tokens=True) == f"user\n<think>{NOTES_TEXT}</think>"


def test_notes_text_encodes_to_notes_ids(qwen3_tokenizer, tiktoken_reference):
    assert qwen3_tokenizer.encode(NOTES_TEXT, add_special_tokens=False) == NOTES_TEXT_IDS
    assert reference_ids(tiktoken_reference, NOTES_TEXT) == NOTES_TEXT_IDS


def test_special_token_text_in_content_is_one_id(qwen3_tokenizer):
    assert qwen3_tokenizer.encode("a<|im_end|>b", add_special_tokens=False) == [64, IM_END, 65]


def test_mixed_script_text_matches_tiktoken(qwen3_tokenizer, tiktoken_reference):
    text = (
        "Hello, how are you? Привет, как дела? 你好，你好吗？ 3.14159 and 2024-06-01\n\n"
        "  indented\tcode()\r\n    return x**2  # it's fine, we'll see\n\u00a0Cafe\u0301 naïve"
    )
    assert qwen3_tokenizer.encode(text, add_special_tokens=False) == reference_ids(tiktoken_reference, text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.lists(
        st.one_of(st.text(alphabet=MIXED_ALPHABET, max_size=12), st.sampled_from(MIXED_WORDS)),
        max_size=24,
    ).map("".join)
)
def test_random_mixed_text_matches_tiktoken(qwen3_tokenizer, tiktoken_reference, text):
    fast_ids = qwen3_tokenizer.encode(text, add_special_tokens=False)
    assert fast_ids == reference_ids(tiktoken_reference, text)
    assert qwen3_tokenizer.decode(fast_ids) == unicodedata.normalize("NFC", text)


def test_chat_template_renders_the_notes_conversation(qwen3_tokenizer):
    rendered = qwen3_tokenizer.apply_chat_template(NOTES_CONVERSATION, tokenize=False, enable_thinking=False)
    assert rendered == NOTES_RENDERING
    # A finished conversation renders the same whatever enable_thinking says, as in Qwen3.
    assert qwen3_tokenizer.apply_chat_template(NOTES_CONVERSATION, tokenize=False) == NOTES_RENDERING


def test_chat_template_ids_are_the_notes_ids(qwen3_tokenizer):
    refusal_ids = qwen3_tokenizer.encode(REFUSAL, add_special_tokens=False)
    expected = [
        *(IM_START, USER, NEWLINE, *NOTES_TEXT_IDS, IM_END, NEWLINE),
        *(IM_START, ASSISTANT, NEWLINE, THINK, DOUBLE_NEWLINE, END_THINK, DOUBLE_NEWLINE),
        *refusal_ids,
        *(IM_END, NEWLINE),
    ]
    assert chat_ids(qwen3_tokenizer, NOTES_CONVERSATION, enable_thinking=False) == expected


def test_generation_prompt_adds_the_empty_think_block_only_without_thinking(qwen3_tokenizer):
    prompt = NOTES_CONVERSATION[:1]
    user_turn = f"<|im_start|>user\n{NOTES_TEXT}<|im_end|>\n"
    no_thinking = qwen3_tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_thinking == user_turn + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    thinking = qwen3_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert thinking == user_turn + "<|im_start|>assistant\n"
    assert qwen3_tokenizer.apply_chat_template(prompt, tokenize=False) == user_turn


def test_system_message_comes_first(qwen3_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *NOTES_CONVERSATION]
    rendered = qwen3_tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n" + NOTES_RENDERING


def test_only_assistant_turns_after_the_last_user_turn_get_a_think_block(qwen3_tokenizer):
    messages = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\na1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    rendered = qwen3_tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
    assert rendered == (
        "<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\na2<|im_end|>\n"
    )


def test_reasoning_content_is_kept_in_the_last_assistant_turn(qwen3_tokenizer):
    messages = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a", "reasoning_content": "\nthought\n"},
    ]
    rendered = qwen3_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\nthought\n</think>\n\na<|im_end|>\n")


def test_unsupported_role_is_refused(qwen3_tokenizer):
    with pytest.raises(Exception, match="Unsupported role tool"):
        qwen3_tokenizer.apply_chat_template([{"role": "tool", "content": "{}"}], tokenize=False)


def test_saved_tokenizer_loads_back_identically(qwen3_tokenizer, tmp_path):
    qwen3_tokenizer.save_pretrained(tmp_path, save_jinja_files=False)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"  # what real Qwen3 checkpoints name
    assert "chat_template" in config

    loaded = load_tokenizer(tmp_path)
    text = "Привет, 你好! It's 2024.\n\n" + NOTES_TEXT
    assert loaded.encode(text) == qwen3_tokenizer.encode(text)
    assert special_token_ids(loaded) == special_token_ids(qwen3_tokenizer)
    assert chat_ids(loaded, NOTES_CONVERSATION, enable_thinking=False) == chat_ids(
        qwen3_tokenizer, NOTES_CONVERSATION, enable_thinking=False
    )
    assert loaded.backend_tokenizer.normalizer is not None


def test_load_tokenizer_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_special_token_ids_refuses_a_tokenizer_that_is_not_qwen3():
    backend = Tokenizer(WordLevel({"[UNK]": 0, "user": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="not a Qwen3 tokenizer"):
        special_token_ids(other)
