"""Verdict events from the engine's per-token labels: pure, no Kafka, no Redis.

Model facts used here (shared notes): user turns read the query heads, assistant turns the response
heads; the prompt verdict is the query heads at the user turn's closing <|im_end|>; label = argmax.
Streaming alerts follow the technical report's debounce: an assistant token is flagged only when it and
the content token before it in the same turn are both flagged under the policy. The first such token of
a turn raises the alert (a gateway cuts generation at `alert_position`). A flagged prompt raises the
alert of its user turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from processor.engine.results import ChunkResult, HeadLabels
from processor.model.labels import SAFE, LabelMaps, Policy, apply_policy, is_flagged
from processor.worker.events import Role, TokenEvent, TokenVerdict, VerdictEvent, VerdictKind
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


@dataclass(frozen=True, slots=True)
class VerdictState:
    """The verdict side of a session (persisted in Redis): debounce and summaries so far."""

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
        return replace(
            self,
            turn=turn,
            previous_flagged=False,
            turn_level=SAFE,
            turn_alert_position=None,
            turn_flag=NO_FLAG,
        )

    def with_debounce(self, previous_flagged: bool, turn_level: str) -> VerdictState:
        # Positional construction: dataclasses.replace cost ~3 us, and this runs for most token events.
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
        state = replace(self, turn_alert_position=position, turn_flag=flag)
        if self.alert_position is None:
            state = replace(state, alert_position=position, conversation_flag=flag)
        return state


@dataclass(frozen=True, slots=True)
class EventTiming:
    sent_at: float | None  # event ts, else the Kafka record's timestamp
    now: float

    @property
    def latency_ms(self) -> float | None:
        return None if self.sent_at is None else round((self.now - self.sent_at) * 1000.0, 3)


def build_verdicts(
    state: VerdictState,
    event: TokenEvent,
    fed: FedTokens,
    result: ChunkResult,
    offset: int,
    config: VerdictConfig,
    timing: EventTiming,
) -> tuple[VerdictState, list[VerdictEvent]]:
    """Verdicts for one event whose fed tokens are result's tokens offset.. (positions follow)."""
    verdicts: list[VerdictEvent] = []
    start_position = result.start_position + offset

    def verdict(kind: VerdictKind, turn: int, role: Role, flag: Flag, **fields) -> VerdictEvent:
        return VerdictEvent(
            conversation_id=event.conversation_id,
            seq=event.seq,
            turn=turn,
            role=role,
            kind=kind,
            risk_level=flag.level,
            risk_prob=flag.prob,
            category=flag.category,
            category_prob=flag.category_prob,
            latency_ms=timing.latency_ms,
            model=config.model_name,
            **fields,
        )

    def closed(turn: ClosedTurn) -> None:
        nonlocal state
        if turn.role == "user" and turn.prompt_index is not None:
            state = state.for_turn(turn.turn)
            index = offset + turn.prompt_index
            position = start_position + turn.prompt_index
            flag = _policy_flag(config.for_role("user"), result.query, index)
            if flag.flagged and state.turn_alert_position is None:
                state = state.with_alert(position, flag)
            verdicts.append(
                verdict(
                    "prompt",
                    turn.turn,
                    "user",
                    flag,
                    tokens=[_token_verdict(config.for_role("user"), result.query, result, index, position)],
                    alert=flag.flagged,
                    alert_position=position if flag.flagged else None,
                )
            )
        if turn.explicit:
            summary = state.for_turn(turn.turn)
            verdicts.append(
                verdict(
                    "turn_end",
                    turn.turn,
                    turn.role,
                    summary.turn_flag,
                    alert=False,
                    alert_position=summary.turn_alert_position,
                )
            )

    for turn in fed.closed_turns:
        if not turn.explicit:
            closed(turn)

    content = [k for k in range(len(fed)) if fed.content[k]]
    if content:
        turn, role = fed.turns[content[0]], fed.roles[content[0]]
        before = state.for_turn(turn)
        state, tokens, summary, alert_position = _content_verdicts(
            before, fed, content, result, offset, start_position, config
        )
        raised = alert_position is not None
        if _publish_tokens(config.mode, role, before.turn_level, state.turn_level, raised):
            verdicts.append(
                verdict(
                    "tokens", turn, role, summary, tokens=tokens, alert=raised, alert_position=alert_position
                )
            )

    for turn in fed.closed_turns:
        if turn.explicit:
            closed(turn)

    if event.end_of_conversation:
        last_turn = max(state.turn, fed.turns[-1] if fed.turns else -1)
        verdicts.append(
            verdict(
                "conversation_end",
                max(last_turn, 0),
                event.role,
                state.conversation_flag,
                alert=False,
                alert_position=state.alert_position,
            )
        )
    return state, verdicts


def error_verdict(
    event: TokenEvent, turn: int, message: str, config: VerdictConfig, timing: EventTiming
) -> VerdictEvent:
    return VerdictEvent(
        conversation_id=event.conversation_id,
        seq=event.seq,
        turn=max(turn, 0),
        role=event.role,
        kind="error",
        risk_level=None,
        risk_prob=None,
        category=None,
        category_prob=None,
        latency_ms=timing.latency_ms,
        model=config.model_name,
        error=message,
    )


def _content_verdicts(
    state: VerdictState,
    fed: FedTokens,
    content: list[int],
    result: ChunkResult,
    offset: int,
    start_position: int,
    config: VerdictConfig,
) -> tuple[VerdictState, list[TokenVerdict], Flag, int | None]:
    """Per-token verdicts of the event's content tokens (one turn), with debounce for assistant turns."""
    role = fed.roles[content[0]]
    heads, labels = result.heads_for_role(role), config.for_role(role)
    tokens: list[TokenVerdict] = []
    first_debounced: Flag | None = None
    alert_position: int | None = None
    last = NO_FLAG
    previous_flagged, turn_level = state.previous_flagged, state.turn_level
    for k in content:
        index, position = offset + k, start_position + k
        tokens.append(_token_verdict(labels, heads, result, index, position))
        last = _policy_flag(labels, heads, index)
        if role != "assistant":
            continue
        debounced = last.flagged and previous_flagged
        previous_flagged, turn_level = last.flagged, last.level if debounced else SAFE
        if debounced:
            first_debounced = first_debounced or last
            if state.turn_alert_position is None:
                state = state.with_alert(position, last)
                alert_position = position
    if (previous_flagged, turn_level) != (state.previous_flagged, state.turn_level):
        state = state.with_debounce(previous_flagged, turn_level)
    summary = last
    if role == "assistant":
        # An undebounced flag is not a verdict yet: the summary stays Safe, without a probability to show.
        summary = first_debounced or (NO_FLAG if last.flagged else last)
    return state, tokens, summary, alert_position


def _publish_tokens(mode: VerdictMode, role: Role, level_before: str, level_after: str, alert: bool) -> bool:
    if mode == "tokens" or alert:
        return True
    if mode == "changes":
        return role == "assistant" and level_before != level_after
    return False


def _policy_flag(labels: RoleLabels, heads: HeadLabels, index: int) -> Flag:
    level = heads.risk_level[index]
    if not labels.flagged[level]:
        return Flag(level=SAFE, prob=heads.risk_prob[index])
    return Flag(
        level=labels.policy_levels[level],
        prob=heads.risk_prob[index],
        category=labels.category_names[heads.category[index]],
        category_prob=heads.category_prob[index],
    )


def _token_verdict(
    labels: RoleLabels, heads: HeadLabels, result: ChunkResult, index: int, position: int
) -> TokenVerdict:
    level = labels.level_names[heads.risk_level[index]]
    safe = level == SAFE
    return TokenVerdict(
        position=position,
        token_id=result.token_ids[index],
        risk_level=level,
        risk_prob=heads.risk_prob[index],
        category=None if safe else labels.category_names[heads.category[index]],
        category_prob=None if safe else heads.category_prob[index],
    )
