"""What the model is fed for one token event: the event's content, wrapped in the chat template.

A pure state machine over the turn structure. In `chat` mode the worker writes the Qwen3 template
(`enable_thinking=False`) itself, so producers send only content:

    <|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n{assistant}<|im_end|>\\n

A turn opens when content of a new role arrives (closing the turn left open), and closes at
`end_of_turn` / `end_of_conversation`. Every assistant turn gets the empty think block, which is how the
template renders an assistant turn that is the newest message; a whole-conversation re-render drops the
block from assistant turns before the last user turn, but a stream cannot know a later user turn will
come. `render_conversation` gives the ids this stream produces for a finished conversation.

A turn opened by text is tokenized as the template's string is: the opener's last newline(s)
("user\\n", "</think>\\n\\n") start the turn's text, so that content starting with a newline merges
with them as in `apply_chat_template` ("\\n" + "\\nhi" gives the one id of "\\n\\n", not two "\\n"), and
an assistant turn's leading newlines are dropped (the template's `content.lstrip('\\n')`). Token ids are
the producer's own: they follow the whole opener, as sent.

In `raw` mode ids are fed as sent and the template is the producer's job; turns are still tracked (a
role change or an end flag closes one) so that verdicts know their turn and heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from processor.events import Role, TokenEvent

if TYPE_CHECKING:
    from processor.model.tokenizer import SpecialTokenIds
    from processor.worker.text import IncrementalTokenizer

TemplateMode = Literal["chat", "raw"]

# The text at the end of each role's opener, which a turn's text content is tokenized after.
OPENER_TAIL_TEXT: dict[Role, str] = {"user": "\n", "assistant": "\n\n"}


@dataclass(frozen=True, slots=True)
class TurnState:
    """The template's part of a session (persisted in Redis with it)."""

    turn: int = -1  # index of the open or last turn; -1 before the first
    open_role: Role | None = None  # role of the open turn, None when no turn is open
    text_tail: str = ""  # text of the open turn not yet committed to ids (see text.py)
    # The tail starts with the opener's last newline(s), not fed yet (a turn opened by text).
    opener_in_tail: bool = False


@dataclass(frozen=True, slots=True)
class ClosedTurn:
    turn: int
    role: Role
    explicit: bool  # closed by the event's end flag, not by a role change
    # Index (in FedTokens) of the token the prompt verdict reads: the user turn's <|im_end|> in chat
    # mode, the turn's last token in raw mode; None when that token was fed by an earlier event.
    prompt_index: int | None = None


# Consecutive fed tokens of one turn, content or the template's own: (start, end) indexes in
# FedTokens.token_ids, role, turn, content. A plain tuple: one is made per token event, and a
# NamedTuple's constructor costs ~10x a tuple's.
FedSpan = tuple[int, int, Role, int, bool]


class FedTokens:
    """Token ids to feed for one event, in spans of one turn each (content or template tokens).

    An event's content is usually one span. It is two when the event closes a text turn whose tail was
    held back (see text.py): that tail is the closed turn's content, fed with this event."""

    __slots__ = ("closed_turns", "content_spans", "spans", "token_ids")

    # A plain __init__: one is built per token event, and a dataclass's default factories cost ~2x.
    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.spans: list[FedSpan] = []
        self.content_spans: list[FedSpan] = []  # the spans whose content flag is set
        self.closed_turns: list[ClosedTurn] = []

    def add(self, token_ids: Sequence[int], role: Role, turn: int, content: bool) -> None:
        if token_ids:
            start = len(self.token_ids)
            self.token_ids.extend(token_ids)
            span = (start, len(self.token_ids), role, turn, content)
            self.spans.append(span)
            if content:
                self.content_spans.append(span)

    @property
    def last_turn(self) -> int | None:
        """The turn of the last token fed; None when nothing is."""
        return self.spans[-1][3] if self.spans else None

    # Per token, for readers that want columns (tests, debugging); the worker reads the spans.
    @property
    def roles(self) -> list[Role]:
        return [role for start, end, role, _, _ in self.spans for _ in range(start, end)]

    @property
    def turns(self) -> list[int]:
        return [turn for start, end, _, turn, _ in self.spans for _ in range(start, end)]

    @property
    def content(self) -> list[bool]:
        return [content for start, end, _, _, content in self.spans for _ in range(start, end)]

    def __len__(self) -> int:
        return len(self.token_ids)


class TurnWriter:
    """Turns token events into fed tokens; one instance per worker, state passed in and out."""

    def __init__(
        self,
        mode: TemplateMode,
        special: SpecialTokenIds | None,
        text_tokenizer: IncrementalTokenizer | None,
    ) -> None:
        if mode == "chat" and special is None:
            raise ValueError("chat template mode needs the tokenizer's special token ids")
        self.mode = mode
        self._special = special
        self._text = text_tokenizer

    def feed(self, state: TurnState, event: TokenEvent) -> tuple[TurnState, FedTokens]:
        fed = FedTokens()
        if event.token_ids or event.text:
            if state.open_role != event.role:
                if state.open_role is not None:
                    state = self._close(state, fed, explicit=False)
                state = self._open(state, event.role, fed, by_text=event.text is not None)
            state = self._add_content(state, event, fed)
        if event.closes_turn and state.open_role is not None:
            state = self._close(state, fed, explicit=True)
        return state, fed

    def _open(self, state: TurnState, role: Role, fed: FedTokens, by_text: bool) -> TurnState:
        state = TurnState(turn=state.turn + 1, open_role=role, text_tail="")
        if self.mode == "chat":
            opener = self._opener(role)
            if by_text and self._text is not None:
                # Its last id ("\n" or "\n\n") is text that the turn's content may merge with.
                state = replace(state, text_tail=OPENER_TAIL_TEXT[role], opener_in_tail=True)
                opener = opener[:-1]
            fed.add(opener, role, state.turn, content=False)
        return state

    def _add_content(self, state: TurnState, event: TokenEvent, fed: FedTokens) -> TurnState:
        role = event.role
        if event.text is not None:
            if self._text is None:
                raise ValueError("text event but the model has no tokenizer")
            text = event.text
            if state.opener_in_tail and role == "assistant" and state.text_tail == OPENER_TAIL_TEXT[role]:
                text = text.lstrip("\n")  # no content yet: the template's content.lstrip('\n')
            ids, tail = self._text.feed(state.text_tail, text)
            return self._add_text_ids(replace(state, text_tail=tail), ids, fed)
        if state.text_tail:  # text before these ids: its held-back tail goes first
            state = self._add_text_ids(replace(state, text_tail=""), self._flush_tail(state), fed)
        fed.add(event.token_ids or [], role, state.turn, content=True)
        return state

    def _add_text_ids(self, state: TurnState, ids: list[int], fed: FedTokens) -> TurnState:
        """Feed a text turn's committed ids: content, but for the opener's newline(s) when they come
        first unmerged (then they are the template's own id)."""
        role = state.open_role
        assert role is not None
        if state.opener_in_tail and ids:
            if ids[0] == self._opener(role)[-1]:  # exactly the opener's tail text: nothing of the content
                fed.add(ids[:1], role, state.turn, content=False)
                ids = ids[1:]
            state = replace(state, opener_in_tail=False)
        fed.add(ids, role, state.turn, content=True)
        return state

    def _close(self, state: TurnState, fed: FedTokens, explicit: bool) -> TurnState:
        role = state.open_role
        assert role is not None
        state = self._add_text_ids(state, self._flush_tail(state), fed)
        if self.mode == "chat":
            special = self._special
            assert special is not None
            prompt_index = len(fed) if role == "user" else None  # the <|im_end|> about to be added
            fed.add([special.im_end, special.newline], role, state.turn, content=False)
        else:
            last_fed_now = fed.last_turn == state.turn
            prompt_index = len(fed) - 1 if role == "user" and last_fed_now else None
        fed.closed_turns.append(ClosedTurn(state.turn, role, explicit, prompt_index))
        return TurnState(turn=state.turn, open_role=None, text_tail="")

    def _flush_tail(self, state: TurnState) -> list[int]:
        if not state.text_tail:
            return []
        assert self._text is not None
        return self._text.flush(state.text_tail)

    def _opener(self, role: Role) -> list[int]:
        special = self._special
        assert special is not None
        if role == "user":
            return [special.im_start, special.user, special.newline]
        return [
            special.im_start,
            special.assistant,
            special.newline,
            special.think,
            special.double_newline,
            special.end_think,
            special.double_newline,
        ]


def render_conversation(
    messages: Sequence[tuple[Role, Sequence[int]]], special: SpecialTokenIds
) -> list[int]:
    """The chat-mode ids the worker feeds for finished turns of (role, content ids): what `guardstream
    score` must run to compare with streamed verdicts."""
    writer = TurnWriter("chat", special, None)
    state = TurnState()
    ids: list[int] = []
    for seq, (role, content) in enumerate(messages):
        event = TokenEvent(
            conversation_id="render", seq=seq, role=role, token_ids=list(content), end_of_turn=True
        )
        state, fed = writer.feed(state, event)
        ids.extend(fed.token_ids)
    return ids
