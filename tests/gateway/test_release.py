"""The hold-back rule as pure bookkeeping: what may be released after each verdict."""

from __future__ import annotations

import random

import pytest

from processor.gateway.release import HoldBack


def released_after(flags: list[bool], finished: bool = True) -> tuple[int, int | None]:
    hold = HoldBack()
    hold.add_tokens(len(flags))
    if finished:
        hold.finish()
    for index, flagged in enumerate(flags):
        hold.record(index, flagged)
    return hold.releasable, hold.cut


def reference(flags: list[bool]) -> int:
    """The released prefix of a finished reply: up to the first flagged pair's first token, else all."""
    for index in range(1, len(flags)):
        if flags[index] and flags[index - 1]:
            return index - 1
    return len(flags)


def test_a_safe_reply_is_released_token_by_token_as_verdicts_arrive() -> None:
    hold = HoldBack()
    hold.add_tokens(3)
    assert hold.releasable == 0
    hold.record(0, False)
    assert hold.releasable == 1
    hold.record(1, False)
    hold.record(2, False)
    assert hold.releasable == 3
    assert not hold.done
    hold.finish()
    assert hold.done


def test_a_token_without_its_verdict_holds_back_everything_after_it() -> None:
    hold = HoldBack()
    hold.add_tokens(3)
    hold.record(1, False)
    hold.record(2, False)
    assert hold.releasable == 0
    assert hold.first_waiting == 0
    hold.record(0, False)
    assert hold.releasable == 3
    assert hold.first_waiting is None


def test_a_flagged_token_waits_for_the_next_verdict_and_is_released_when_it_clears() -> None:
    hold = HoldBack()
    hold.add_tokens(2)
    hold.record(0, True)
    assert hold.releasable == 0
    hold.record(1, False)
    assert hold.releasable == 2
    assert hold.cut is None


def test_a_flagged_last_token_is_released_at_the_turns_end() -> None:
    hold = HoldBack()
    hold.add_tokens(2)
    hold.record(0, False)
    hold.record(1, True)
    assert hold.releasable == 1
    hold.finish()
    assert hold.releasable == 2
    assert hold.done


def test_a_flagged_pair_cuts_before_its_first_token_forever() -> None:
    hold = HoldBack()
    hold.add_tokens(5)
    for index, flagged in enumerate([False, True, True, False, False]):
        hold.record(index, flagged)
    assert hold.cut == 1
    assert hold.releasable == 1
    assert hold.done
    hold.finish()
    assert hold.releasable == 1


def test_the_workers_alert_cuts_before_the_pairs_first_token() -> None:
    hold = HoldBack()
    hold.add_tokens(4)
    for index in range(4):
        hold.record(index, False)  # the gateway's policy saw nothing (a looser policy)
    hold.alert(2)
    assert hold.cut == 1
    assert hold.releasable == 1


def test_a_redelivered_verdict_changes_nothing() -> None:
    hold = HoldBack()
    hold.add_tokens(2)
    hold.record(0, False)
    hold.record(0, False)
    assert hold.releasable == 1
    with pytest.raises(IndexError):
        hold.record(2, False)


@pytest.mark.parametrize("seed", range(200))
def test_random_replies_release_exactly_the_prefix_before_the_first_flagged_pair(seed: int) -> None:
    rng = random.Random(seed)
    flags = [rng.random() < 0.3 for _ in range(rng.randint(0, 30))]
    hold = HoldBack()
    order = list(range(len(flags)))
    rng.shuffle(order)
    hold.add_tokens(len(flags))
    released = 0
    for index in order:  # verdicts in any order: what is released only grows, and never passes the cut
        hold.record(index, flags[index])
        assert hold.releasable >= released
        released = hold.releasable
        assert released <= reference(flags)
        for token in range(released):  # every released token is cleared by its successor or the end
            assert not (flags[token] and token + 1 < len(flags) and flags[token + 1])
    hold.finish()
    assert hold.releasable == reference(flags)
    assert hold.done
