"""Offline moderation of one whole conversation (`guardstream score`), through the same engine the
worker uses, so `--chunk-size` exercises exactly the incremental path the service runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from processor.engine import ChunkResult, ChunkStatus, EngineConfig, GuardEngine
from processor.engine.kv_cache import bytes_per_token, resolve_attention_and_cache
from processor.model.labels import SAFE
from processor.model.loader import GuardModel
from processor.model.qwen3_guard import HEAD_NAMES
from processor.model.tokenizer import SpecialTokenIds, special_token_ids


@dataclass(frozen=True)
class TokenVerdict:
    position: int
    token_id: int
    role: str
    risk_level: str
    risk_prob: float
    category: str | None  # None when the risk level is Safe
    category_prob: float | None
    heads: dict[str, list[float]] | None = None

    def as_json(self) -> dict[str, Any]:
        record = {
            "position": self.position,
            "token_id": self.token_id,
            "role": self.role,
            "risk_level": self.risk_level,
            "risk_prob": self.risk_prob,
            "category": self.category,
            "category_prob": self.category_prob,
        }
        if self.heads is not None:
            record["heads"] = self.heads
        return record


def roles_of(token_ids: Sequence[int], special: SpecialTokenIds) -> list[str]:
    """Role of each position: that of the enclosing `<|im_start|>ROLE` block (user before any block).

    A system block counts as prompt side (user), the only other role the heads know.
    """
    roles, role = [], "user"
    for index, token_id in enumerate(token_ids):
        if token_id == special.im_start and index + 1 < len(token_ids):
            role = "assistant" if token_ids[index + 1] == special.assistant else "user"
        roles.append(role)
    return roles


def verdicts_for(
    model: GuardModel, result: ChunkResult, roles: Sequence[str], with_heads: bool = False
) -> list[TokenVerdict]:
    """Name the labels of one chunk's tokens, reading each token's heads from its role."""
    verdicts = []
    for offset, token_id in enumerate(result.token_ids):
        position = result.start_position + offset
        role = roles[offset]
        level_names, category_names = model.labels.for_role(role)
        head = result.heads_for_role(role)
        risk_level = level_names[head.risk_level[offset]]
        is_safe = risk_level == SAFE
        heads = None
        if with_heads and result.probabilities is not None:
            heads = {name: result.probabilities[name][offset] for name in HEAD_NAMES}
        verdicts.append(
            TokenVerdict(
                position=position,
                token_id=token_id,
                role=role,
                risk_level=risk_level,
                risk_prob=head.risk_prob[offset],
                category=None if is_safe else category_names[head.category[offset]],
                category_prob=None if is_safe else head.category_prob[offset],
                heads=heads,
            )
        )
    return verdicts


def single_conversation_engine(
    model: GuardModel,
    length: int,
    chunk_size: int,
    all_heads: bool,
    kv_cache_dtype: str = "auto",
    attention_backend: str = "auto",
) -> GuardEngine:
    """An engine sized for one conversation of `length` tokens."""
    block_size = 16
    blocks = -(-max(length, 1) // block_size)
    # Sized in the element type the engine will store (the same resolution as its own).
    _, cache_dtype = resolve_attention_and_cache(attention_backend, kv_cache_dtype, model.device, model.dtype)
    return GuardEngine(
        model,
        EngineConfig(
            block_size=block_size,
            kv_cache_bytes=blocks * block_size * bytes_per_token(model.config, cache_dtype),
            max_batch_tokens=max(chunk_size, 1),
            keep_probabilities=all_heads,
            kv_cache_dtype=kv_cache_dtype,
            attention_backend=attention_backend,
        ),
    )


def score_ids(
    model: GuardModel,
    token_ids: Sequence[int],
    chunk_size: int | None = None,
    all_heads: bool = False,
    kv_cache_dtype: str = "auto",
    attention_backend: str = "auto",
) -> list[TokenVerdict]:
    """Per-token verdicts of a templated conversation; `chunk_size` feeds it incrementally.
    `kv_cache_dtype` and `attention_backend` as the engine's: "auto" gives what a worker with the same
    settings gives."""
    if model.tokenizer is None:
        raise ValueError(f"{model.path} ships no tokenizer, needed to find the turns' roles")
    token_ids = list(token_ids)
    roles = roles_of(token_ids, special_token_ids(model.tokenizer))
    step = chunk_size or len(token_ids)
    engine = single_conversation_engine(
        model, len(token_ids), step, all_heads, kv_cache_dtype, attention_backend
    )
    verdicts: list[TokenVerdict] = []
    for start in range(0, len(token_ids), step):
        engine.submit("score", token_ids[start : start + step])
        for result in engine.run_until_idle():
            if result.status is not ChunkStatus.OK:
                raise ValueError(
                    f"the conversation has {len(token_ids)} tokens, past the model's "
                    f"{model.max_positions} positions ({result.status.value})"
                )
            verdicts += verdicts_for(model, result, roles[start : start + step], all_heads)
    return verdicts


def template_messages(model: GuardModel, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered by the model's own chat template (no thinking)."""
    if model.tokenizer is None:
        raise ValueError(f"{model.path} ships no tokenizer; use --ids with templated token ids")
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
    return model.tokenizer.encode(text, add_special_tokens=False)
