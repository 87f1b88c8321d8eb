"""Label names and the strict/loose policy, read from the checkpoint's config maps."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Policy(StrEnum):
    """How Controversial counts: the report's "strict" treats it as Unsafe, "loose" as Safe."""

    STRICT = "strict"
    LOOSE = "loose"


SAFE = "Safe"
UNSAFE = "Unsafe"
CONTROVERSIAL = "Controversial"


def _ordered_names(label_map: dict[str, str], expected_count: int, field: str) -> tuple[str, ...]:
    names = tuple(label_map[str(index)] for index in range(len(label_map)))
    if len(names) != expected_count:
        raise ValueError(f"config.json {field} has {len(names)} labels, the heads have {expected_count}")
    return names


@dataclass(frozen=True)
class LabelMaps:
    """Class names in the checkpoint's index order, for the response and the query heads."""

    risk_levels: tuple[str, ...]
    categories: tuple[str, ...]
    query_risk_levels: tuple[str, ...]
    query_categories: tuple[str, ...]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LabelMaps:
        return cls(
            risk_levels=_ordered_names(
                config["response_risk_level_map"], config["num_risk_level"], "response_risk_level_map"
            ),
            categories=_ordered_names(
                config["response_category_map"], config["num_category"], "response_category_map"
            ),
            query_risk_levels=_ordered_names(
                config["query_risk_level_map"], config["num_query_risk_level"], "query_risk_level_map"
            ),
            query_categories=_ordered_names(
                config["query_category_map"], config["num_query_category"], "query_category_map"
            ),
        )

    def for_role(self, role: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(risk level names, category names) of the heads this role reads: user -> query heads."""
        if role == "user":
            return self.query_risk_levels, self.query_categories
        return self.risk_levels, self.categories


def is_flagged(risk_level: str, policy: Policy) -> bool:
    """Whether a token's level counts as a flag under the policy."""
    if risk_level == UNSAFE:
        return True
    return risk_level == CONTROVERSIAL and policy is Policy.STRICT


def apply_policy(risk_level: str, policy: Policy) -> str:
    """The level a gateway should act on: loose reads Controversial as Safe, strict as Unsafe."""
    if risk_level == CONTROVERSIAL:
        return UNSAFE if policy is Policy.STRICT else SAFE
    return risk_level
