"""The upstream's reply as the gateway tokenizes it: the ids it sends the workers, and the text each covers.

The gateway tokenizes the reply itself and sends token ids, so every verdict names a token whose text
the gateway knows exactly. The ids equal the tokenizer's ids for the whole reply however the upstream
split it into deltas (`IncrementalTokenizer`: a tail that could still merge is held until more text or
the end). The worker feeds ids after the assistant opener, as the chat template renders the turn, and
the template drops the content's leading newlines, so the reply's are dropped here too.

Byte-level BPE tokens need not end on a character boundary; released text is decoded incrementally, so
a character split over two tokens is released with the second.
"""

from __future__ import annotations

import codecs
import functools
from typing import TYPE_CHECKING

from processor.worker.text import IncrementalTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a BPE token spells each byte with -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(character): byte for byte, character in zip(printable, characters, strict=True)}


class ReplyTokenizer:
    """What one gateway needs of the tokenizer: incremental ids, and each id's bytes."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.incremental = IncrementalTokenizer(tokenizer)
        self._tokens = tokenizer.convert_ids_to_tokens
        self._alphabet = _byte_level_alphabet()

    @functools.lru_cache(maxsize=65536)  # noqa: B019  (one instance a process; the vocabulary bounds it)
    def token_bytes(self, token_id: int) -> bytes:
        token = self._tokens(token_id)
        return bytes(self._alphabet[character] for character in token)


class Reply:
    """One reply: ids so far, the bytes each covers, and the text released so far."""

    def __init__(self, tokenizer: ReplyTokenizer) -> None:
        self._tokenizer = tokenizer
        self._tail = ""
        self._started = False  # content other than leading newlines has arrived
        self.token_ids: list[int] = []
        self._released = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, text: str) -> list[int]:
        """The ids that `text` settles (possibly none)."""
        if not self._started:
            text = text.lstrip("\n")  # the template's content.lstrip('\n')
            if not text:
                return []
            self._started = True
        ids, self._tail = self._tokenizer.incremental.feed(self._tail, text)
        self.token_ids += ids
        return ids

    def finish(self) -> list[int]:
        """The held-back tail's ids, at the reply's end."""
        ids = self._tokenizer.incremental.flush(self._tail)
        self._tail = ""
        self.token_ids += ids
        return ids

    @property
    def released(self) -> int:
        return self._released

    def release(self, count: int) -> str:
        """The text of tokens [released, count), less a trailing partial character (kept for later)."""
        if count <= self._released:
            return ""
        data = b"".join(
            self._tokenizer.token_bytes(token_id) for token_id in self.token_ids[self._released : count]
        )
        self._released = count
        return self._decoder.decode(data)
