"""Which of the reply's tokens may be released: the hold-back rule, as pure bookkeeping over token indexes.

The worker's streaming alert is the report's debounce: an assistant token and the content token before
it in the same turn both flagged. So a flagged token cannot be released until the next token's verdict
clears it (that token is not flagged) or the turn ends (nothing follows it); when the next one is flagged
too, the pair alerts and nothing from the pair's first token on is ever released. A token is released
only once it and every token before it has a verdict, so the released text is always a prefix.
"""

from __future__ import annotations


class HoldBack:
    """Token indexes count the reply's content tokens from 0, in the order they were produced."""

    def __init__(self) -> None:
        self._flagged: list[bool | None] = []  # per token: None until its verdict arrives
        self._verdicted = 0  # length of the prefix whose verdicts have all arrived
        self._finished = False  # no more tokens will come (the upstream ended)
        self._cut: int | None = None  # first token never to be released

    @property
    def sent(self) -> int:
        return len(self._flagged)

    @property
    def verdicted(self) -> int:
        """Tokens from the first whose verdicts have all arrived."""
        return self._verdicted

    @property
    def cut(self) -> int | None:
        """Index of the alerting pair's first token, once an alert is known."""
        return self._cut

    @property
    def finished(self) -> bool:
        return self._finished

    def add_tokens(self, count: int) -> None:
        self._flagged.extend([None] * count)

    def finish(self) -> None:
        self._finished = True

    def record(self, index: int, flagged: bool) -> None:
        """A token's verdict under the gateway's policy; the same verdict twice (a redelivery) is harmless."""
        if not 0 <= index < len(self._flagged):
            raise IndexError(f"verdict for token {index}, but {len(self._flagged)} tokens were sent")
        self._flagged[index] = flagged
        while self._verdicted < len(self._flagged) and self._flagged[self._verdicted] is not None:
            index = self._verdicted
            if self._cut is None and index > 0 and self._flagged[index] and self._flagged[index - 1]:
                self._cut = index - 1
            self._verdicted += 1

    def alert(self, index: int) -> None:
        """The worker's alert at token `index` (the pair's second token): cut before the pair's first."""
        self.cut_before(max(index - 1, 0))

    def cut_before(self, index: int) -> None:
        self._cut = index if self._cut is None else min(self._cut, index)

    @property
    def releasable(self) -> int:
        """How many tokens from the first may be released now."""
        count = self._verdicted
        if self._cut is not None:
            return min(count, self._cut)
        all_in = self._finished and count == len(self._flagged)
        if count and self._flagged[count - 1] and not all_in:
            count -= 1  # flagged, and the next token's verdict (or the turn's end) is still to come
        return count

    @property
    def done(self) -> bool:
        """Nothing more can be released: cut, or every token of a finished reply is cleared."""
        return self._cut is not None or (self._finished and self._verdicted == len(self._flagged))

    @property
    def first_waiting(self) -> int | None:
        """The first token still waiting for its verdict; None when none is."""
        return self._verdicted if self._verdicted < len(self._flagged) else None
