"""Incremental tokenization of streamed text: the ids fed for a turn equal the tokenizer's ids for the
turn's whole text, however the text was split into events.

Byte-level BPE never merges across pre-tokens, so the ids of a text are the concatenation of its
pre-tokens' ids. A pre-token is final once later text cannot change where it ends. Only two things can
change with more text: the last pre-token (it may grow) and, when the text ends in whitespace, every
pre-token touching that trailing whitespace run (the newline rules `\\s*[\\r\\n]+` and `\\s+(?!\\S)` regroup
it, e.g. " \\n" + " " becomes " \\n \\n" once "\\n" arrives). Everything before those is committed; the
rest is the tail, kept (in the Redis session) until the next text of the turn or its end.

Content text is tokenized as plain text: special-token strings such as "<|im_end|>" inside it stay
characters, so a producer cannot forge chat-template structure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


class IncrementalTokenizer:
    """Pure functions of (tail, new text); the caller keeps the tail per turn."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        backend = tokenizer.backend_tokenizer
        self._normalizer = backend.normalizer
        self._pre_tokenizer = backend.pre_tokenizer
        self._model = backend.model
        if self._pre_tokenizer is None:
            raise ValueError("the tokenizer has no pre-tokenizer; incremental tokenization needs one")

    def feed(self, tail: str, text: str) -> tuple[list[int], str]:
        """(ids now final, new tail) after appending `text` to the turn's uncommitted `tail`."""
        whole = self._normalize(tail + text)
        pieces = self._pre_tokenizer.pre_tokenize_str(whole)
        if not pieces:
            return [], whole
        settled = _settled_piece_count(whole, pieces)
        ids = self._piece_ids(pieces[:settled])
        new_tail = whole[pieces[settled][1][0] :] if settled < len(pieces) else ""
        return ids, new_tail

    def flush(self, tail: str) -> list[int]:
        """All ids of the tail, at the end of a turn."""
        if not tail:
            return []
        return self._piece_ids(self._pre_tokenizer.pre_tokenize_str(self._normalize(tail)))

    def _normalize(self, text: str) -> str:
        return self._normalizer.normalize_str(text) if self._normalizer is not None else text

    def _piece_ids(self, pieces: list[tuple[str, tuple[int, int]]]) -> list[int]:
        return [token.id for piece, _ in pieces for token in self._model.tokenize(piece)]


def _settled_piece_count(text: str, pieces: list[tuple[str, tuple[int, int]]]) -> int:
    """How many leading pre-tokens no appended text can change."""
    unsettled_from = len(text.rstrip())  # start of the trailing whitespace run (len(text) if none)
    settled = len(pieces) - 1  # the last pre-token may always grow
    while settled > 0 and pieces[settled - 1][1][1] > unsettled_from:
        settled -= 1
    return settled
