"""Verdict events from the engine's per-token labels: pure, no Kafka, no Redis.

Model facts used here (shared notes): user turns read the query heads, assistant turns the response
heads; the prompt verdict is the query heads at the user turn's closing <|im_end|>; label = argmax.
Streaming alerts follow the technical report's debounce: an assistant token is flagged only when it and
the content token before it in the same turn are both flagged under the policy. The first such token of
a turn raises the alert (a gateway cuts generation at `alert_position`). A flagged prompt raises the
alert of its user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

from processor.engine.results import ChunkResult, HeadLabels
from processor.events import Role, TokenEvent, Verdict, VerdictKind
from processor.model.labels import SAFE, LabelMaps, Policy, apply_policy, is_flagged
from processor.worker.template import ClosedTurn, FedTokens

VerdictMode = Literal["tokens", "changes", "turns"]


@dataclass(frozen=True)
class RoleLabels:
    """What one role's heads' class indexes mean, with each risk level read under the policy."""

    level_names: tuple[str, ...]
    category_names: tuple[str, ...]
    policy_levels: tuple[str, ...]  # apply_policy of each level
    flagged: tuple[bool, ...]  # is_flagged of each policy level


@dataclass(frozen=True)
class VerdictConfig:
    labels: LabelMaps
    policy: Policy
    mode: VerdictMode
    model_name: str
    # Both roles' tables, built once: asked per token event (a functools.cache on the method hashed the
    # whole config, label maps included, at every call: ~1 us).
    _role_labels: dict[str, RoleLabels] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tables = {role: self._build_role_labels(role) for role in get_args(Role)}
        object.__setattr__(self, "_role_labels", tables)  # frozen: set once, here

    def for_role(self, role: Role) -> RoleLabels:
        return self._role_labels[role]

    def _build_role_labels(self, role: Role) -> RoleLabels:
        level_names, category_names = self.labels.for_role(role)
        policy_levels = tuple(apply_policy(level, self.policy) for level in level_names)
        flagged = tuple(is_flagged(level, self.policy) for level in policy_levels)
        return RoleLabels(level_names, category_names, policy_levels, flagged)


@dataclass(frozen=True, slots=True)
class Flag:
    """A summary level under the policy, with the class and probability it came from."""

    level: str = SAFE
    prob: float | None = None
    category: str | None = None
    category_prob: float | None = None

    @property
    def flagged(self) -> bool:
        return self.level != SAFE


NO_FLAG = Flag()


class VerdictState(NamedTuple):
    """The verdict side of a session (persisted in Redis): debounce and summaries so far.

    Immutable, and a NamedTuple rather than a frozen dataclass: a new one is made for most token events
    (the debounce moves), and a frozen dataclass's __init__ costs ~5x a tuple's.
    """

    turn: int = -1  # the turn the fields below describe
    previous_flagged: bool = False  # the turn's last content token was flagged (debounce)
    turn_level: str = SAFE  # debounced policy level at the turn's last content token ("changes" mode)
    turn_alert_position: int | None = None
    turn_flag: Flag = NO_FLAG  # what raised the turn's alert
    conversation_flag: Flag = NO_FLAG  # the first alert of the conversation
    alert_position: int | None = None  # first alert position in the conversation

    def for_turn(self, turn: int) -> VerdictState:
        if turn == self.turn:
            return self
        return self._replace(
            turn=turn, previous_flagged=False, turn_level=SAFE, turn_alert_position=None, turn_flag=NO_FLAG
        )

    def with_debounce(self, previous_flagged: bool, turn_level: str) -> VerdictState:
        return VerdictState(
            self.turn,
            previous_flagged,
            turn_level,
            self.turn_alert_position,
            self.turn_flag,
            self.conversation_flag,
            self.alert_position,
        )

    def with_alert(self, position: int, flag: Flag) -> VerdictState:
        state = self._replace(turn_alert_position=position, turn_flag=flag)
        if self.alert_position is None:
            state = state._replace(alert_position=position, conversation_flag=flag)
        return state


def latency_ms(sent_at: float | None, now: float) -> float | None:
    """From the event's ts (else its record's timestamp) to now, in ms to the microsecond, as verdicts
    carry it (round to an integer, then divide: round(x, 3) costs ~8x, once per token event)."""
    return None if sent_at is None else round((now - sent_at) * 1_000_000.0) / 1000.0


# A verdict's summary fields: (risk_level, risk_prob, category, category_prob). Tuples, not Flags, on
# the per-event path: a frozen dataclass costs ~0.6 us to build and most events need none.
Summary = tuple[str | None, float | None, str | None, float | None]
NO_SUMMARY: Summary = (SAFE, None, None, None)
# A summary read from the heads: always a level (what a Flag is made of).
LabelSummary = tuple[str, float | None, str | None, float | None]


def build_verdicts(
    state: VerdictState,
    event: TokenEvent,
    fed: FedTokens,
    result: ChunkResult,
    offset: int,
    config: VerdictConfig,
    latency: float | None,
) -> tuple[VerdictState, list[Verdict]]:
    """Verdicts for one event whose fed tokens are result's tokens offset.. (positions follow).

    Runs for every token event (tens of thousands a second): verdicts are built as the wire's dicts
    directly, and the common event (content tokens only) takes no branch it does not need.
    """
    verdicts: list[Verdict] = []
    start_position = result.start_position + offset
    closed_turns = fed.closed_turns
    for turn in closed_turns:
        if not turn.explicit:
            state = _closed_turn(
                state, verdicts, event, turn, result, offset, start_position, config, latency
            )

    content_spans = fed.content_spans
    if content_spans:
        # One verdict lists all the content the event fed, each token read with its own turn's heads:
        # usually one span; two when the event closed a text turn whose held-back tail it fed. The
        # verdict's turn and role are the last span's (the event's own content, when it fed any); its
        # summary is that of the span that raised an alert, else the last span's.
        tokens: list[dict] = []
        summary: Summary = NO_SUMMARY
        alert_position: int | None = None
        level_changed = False
        for start, end, role, content_turn, _ in content_spans:
            before = state.for_turn(content_turn)
            state, span_tokens, span_summary, span_alert = _content_verdicts(
                before, role, range(start, end), result, offset, start_position, config
            )
            tokens += span_tokens
            if alert_position is None:
                summary, alert_position = span_summary, span_alert
            level_changed = level_changed or (role == "assistant" and before.turn_level != state.turn_level)
        raised = alert_position is not None
        mode = config.mode
        if mode == "tokens" or raised or (mode == "changes" and level_changed):
            verdicts.append(
                _verdict(
                    event,
                    "tokens",
                    content_turn,
                    role,
                    summary,
                    tokens,
                    raised,
                    alert_position,
                    latency,
                    config,
                )
            )

    for turn in closed_turns:
        if turn.explicit:
            state = _closed_turn(
                state, verdicts, event, turn, result, offset, start_position, config, latency
            )

    if event.end_of_conversation:
        last_fed = fed.last_turn
        last_turn = state.turn if last_fed is None else max(state.turn, last_fed)
        verdicts.append(
            _verdict(
                event,
                "conversation_end",
                max(last_turn, 0),
                event.role,
                _flag_summary(state.conversation_flag),
                [],
                False,
                state.alert_position,
                latency,
                config,
            )
        )
    return state, verdicts


def error_verdict(
    event: TokenEvent, turn: int, message: str, config: VerdictConfig, latency: float | None
) -> Verdict:
    verdict = _verdict(
        event, "error", max(turn, 0), event.role, (None, None, None, None), [], False, None, latency, config
    )
    verdict["error"] = message
    return verdict


def _verdict(
    event: TokenEvent,
    kind: VerdictKind,
    turn: int,
    role: Role,
    summary: Summary,
    tokens: list[dict],
    alert: bool,
    alert_position: int | None,
    latency: float | None,
    config: VerdictConfig,
) -> Verdict:
    """A VerdictEvent as the wire carries it (field order as the contract's)."""
    return {
        "conversation_id": event.conversation_id,
        "seq": event.seq,
        "turn": turn,
        "role": role,
        "kind": kind,
        "risk_level": summary[0],
        "risk_prob": summary[1],
        "category": summary[2],
        "category_prob": summary[3],
        "tokens": tokens,
        "alert": alert,
        "alert_position": alert_position,
        "latency_ms": latency,
        "model": config.model_name,
        "error": None,
    }


def _closed_turn(
    state: VerdictState,
    verdicts: list[Verdict],
    event: TokenEvent,
    turn: ClosedTurn,
    result: ChunkResult,
    offset: int,
    start_position: int,
    config: VerdictConfig,
    latency: float | None,
) -> VerdictState:
    """The prompt verdict of a closed user turn, and the turn_end verdict of an explicit close."""
    if turn.role == "user" and turn.prompt_index is not None:
        state = state.for_turn(turn.turn)
        index = offset + turn.prompt_index
        position = start_position + turn.prompt_index
        labels = config.for_role("user")
        summary = _policy_summary(labels, result.query, index)
        flagged = summary[0] != SAFE
        if flagged and state.turn_alert_position is None:
            state = state.with_alert(position, Flag(*summary))
        token = _token_verdict(labels, result.query, result.token_ids, index, position)
        verdicts.append(
            _verdict(
                event,
                "prompt",
                turn.turn,
                "user",
                summary,
                [token],
                flagged,
                position if flagged else None,
                latency,
                config,
            )
        )
    if turn.explicit:
        ending = state.for_turn(turn.turn)
        verdicts.append(
            _verdict(
                event,
                "turn_end",
                turn.turn,
                turn.role,
                _flag_summary(ending.turn_flag),
                [],
                False,
                ending.turn_alert_position,
                latency,
                config,
            )
        )
    return state


def _content_verdicts(
    state: VerdictState,
    role: Role,
    content: Sequence[int],
    result: ChunkResult,
    offset: int,
    start_position: int,
    config: VerdictConfig,
) -> tuple[VerdictState, list[dict], Summary, int | None]:
    """Per-token verdicts of the event's content tokens (one turn), with debounce for assistant turns."""
    heads, labels = result.heads_for_role(role), config.for_role(role)
    token_ids, levels = result.token_ids, heads.risk_level
    flagged, policy_levels = labels.flagged, labels.policy_levels
    assistant = role == "assistant"
    tokens: list[dict] = []
    first_debounced: int | None = None  # index of the turn's first debounced token in this event
    alert_position: int | None = None
    alert_open = state.turn_alert_position is None
    previous_flagged, turn_level = state.previous_flagged, state.turn_level
    index = offset
    for k in content:
        index, position = offset + k, start_position + k
        tokens.append(_token_verdict(labels, heads, token_ids, index, position))
        if not assistant:
            continue
        level = levels[index]
        is_flagged = flagged[level]
        debounced = is_flagged and previous_flagged
        previous_flagged, turn_level = is_flagged, policy_levels[level] if debounced else SAFE
        if debounced and first_debounced is None:
            first_debounced = index
            if alert_open:
                alert_position = position
    if alert_position is not None:
        assert first_debounced is not None  # the alert is the first debounced token's
        state = state.with_alert(alert_position, Flag(*_policy_summary(labels, heads, first_debounced)))
    if (previous_flagged, turn_level) != (state.previous_flagged, state.turn_level):
        state = state.with_debounce(previous_flagged, turn_level)
    last = _policy_summary(labels, heads, index)
    if not assistant:
        return state, tokens, last, alert_position
    # An undebounced flag is not a verdict yet: the summary stays Safe, without a probability to show.
    summary: Summary
    if first_debounced is not None:
        summary = _policy_summary(labels, heads, first_debounced)
    else:
        summary = NO_SUMMARY if last[0] != SAFE else last
    return state, tokens, summary, alert_position


def _policy_summary(labels: RoleLabels, heads: HeadLabels, index: int) -> LabelSummary:
    level = heads.risk_level[index]
    if not labels.flagged[level]:
        return (SAFE, heads.risk_prob[index], None, None)
    return (
        labels.policy_levels[level],
        heads.risk_prob[index],
        labels.category_names[heads.category[index]],
        heads.category_prob[index],
    )


def _flag_summary(flag: Flag) -> Summary:
    return (flag.level, flag.prob, flag.category, flag.category_prob)


def _token_verdict(
    labels: RoleLabels, heads: HeadLabels, token_ids: list[int], index: int, position: int
) -> dict:
    """A TokenVerdict as the wire carries it; category is null when the model said Safe."""
    level = labels.level_names[heads.risk_level[index]]
    safe = level == SAFE
    return {
        "position": position,
        "token_id": token_ids[index],
        "risk_level": level,
        "risk_prob": heads.risk_prob[index],
        "category": None if safe else labels.category_names[heads.category[index]],
        "category_prob": None if safe else heads.category_prob[index],
    }
