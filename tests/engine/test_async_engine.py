"""The asyncio front: concurrent callers share steps, rebuilds use the history, failures are explicit."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from processor.engine import (
    AsyncGuardEngine,
    EngineConfig,
    GuardEngine,
    HistoryUnavailableError,
    async_engine,
)
from processor.engine.kv_cache import bytes_per_token
from processor.model import load_guard_model


class DictHistory:
    def __init__(self, tokens: dict[str, list[int]]) -> None:
        self.tokens = tokens

    async def load(self, conversation_id: str, length: int) -> list[int]:
        return self.tokens.get(conversation_id, [])[:length]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_guard_model(tiny_model_dir, device="cpu")


def new_engine(model) -> GuardEngine:
    return GuardEngine(model, EngineConfig(kv_cache_bytes=4096 * bytes_per_token(model.config, model.dtype)))


async def test_concurrent_conversations_are_batched_into_shared_steps(model):
    front = AsyncGuardEngine(new_engine(model))
    results = await asyncio.gather(
        *(front.moderate(f"c{index}", [100 + index, 7, 8], 0) for index in range(32))
    )
    assert [result.conversation_id for result in results] == [f"c{index}" for index in range(32)]
    stats = front.stats()
    assert stats.steps < 32, f"32 concurrent submissions took {stats.steps} steps"
    assert stats.active_conversations == 32
    await front.close()


async def test_unknown_conversation_is_rebuilt_from_history_with_identical_results(model):
    tokens = list(range(500, 540))
    reference = await AsyncGuardEngine(new_engine(model)).moderate("c", tokens, 0)
    # A fresh engine (another worker) sees the conversation 30 tokens in: it must rebuild first.
    front = AsyncGuardEngine(new_engine(model), DictHistory({"c": tokens[:30]}))
    result = await front.moderate("c", tokens[30:], 30)
    assert result.start_position == 30
    assert result.response.risk_level == reference.response.risk_level[30:]
    assert result.response.risk_prob == pytest.approx(reference.response.risk_prob[30:], abs=1e-4)
    assert front.stats().rebuilt_tokens == 30
    await front.close()


async def test_tokens_run_but_never_made_durable_are_dropped(model):
    """A crash after the step but before the caller's commit: the redelivery says fewer tokens are known."""
    front = AsyncGuardEngine(new_engine(model))
    first = await front.moderate("c", [1, 2, 3, 4], 0)
    await front.moderate("c", [9, 9], 4)  # never made durable by the caller
    again = await front.moderate("c", [5, 6], 4)
    fresh = await AsyncGuardEngine(new_engine(model)).moderate("d", [1, 2, 3, 4, 5, 6], 0)
    assert first.start_position == 0 and again.start_position == 4
    assert again.response.risk_prob == pytest.approx(fresh.response.risk_prob[4:], abs=1e-5)
    await front.close()


async def test_missing_history_is_an_explicit_error(model):
    front = AsyncGuardEngine(new_engine(model), DictHistory({}))
    with pytest.raises(HistoryUnavailableError, match="needs its first 10 tokens"):
        await front.moderate("lost", [1, 2], 10)
    # The front keeps serving other conversations.
    assert (await front.moderate("ok", [1, 2], 0)).start_position == 0
    await front.close()


async def test_a_batch_answers_in_request_order_and_one_failure_stays_its_own(model):
    """moderate_many: one answer list, in request order; a request whose history is missing gets its
    error in its place, the others their results (equal to moderating each on its own)."""
    front = AsyncGuardEngine(new_engine(model), DictHistory({}))
    requests = [("a", [100, 101, 102], 0), ("lost", [1, 2], 10), ("b", [200, 201], 0), ("a", [103], 3)]
    answers = await front.moderate_many(requests)
    assert isinstance(answers[1], HistoryUnavailableError)
    first_a, b, second_a = answers[0], answers[2], answers[3]
    assert (first_a.conversation_id, b.conversation_id, second_a.conversation_id) == ("a", "b", "a")
    assert (first_a.token_ids, b.token_ids, second_a.token_ids) == ([100, 101, 102], [200, 201], [103])
    assert second_a.start_position == 3
    alone = AsyncGuardEngine(new_engine(model))
    reference = await alone.moderate("a", [100, 101, 102, 103], 0)
    assert first_a.response.risk_prob + second_a.response.risk_prob == pytest.approx(
        reference.response.risk_prob, abs=1e-5
    )
    assert await front.moderate_many([]) == []
    await front.close()
    await alone.close()


class StepWrapped:
    """The engine with its `step` replaced: a compiled GuardEngine's methods cannot be assigned to."""

    def __init__(self, engine: GuardEngine, step: Callable[[], list]) -> None:
        self._engine, self.step = engine, step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


async def test_a_failed_step_answers_every_waiting_request_with_its_error(model):
    """An engine step that raises must not leave a caller waiting: every request of the batch gets
    the error, the engine drops its conversations, and the next call is served."""
    engine = new_engine(model)
    step = engine.step
    failures = iter([RuntimeError("injected step failure")])

    def failing_once():
        error = next(failures, None)
        if error is not None:
            raise error
        return step()

    front = AsyncGuardEngine(StepWrapped(engine, failing_once))
    answers = await asyncio.wait_for(front.moderate_many([("a", [100, 101], 0), ("b", [200], 0)]), timeout=30)
    assert [str(answer) for answer in answers] == ["injected step failure"] * 2
    assert front.stats().active_conversations == 0
    again = await front.moderate("a", [100, 101], 0)
    assert again.start_position == 0 and again.token_ids == [100, 101]
    await front.close()


@pytest.mark.parametrize(("inline_below", "expect_loop_thread"), [(1e9, True), (0.0, False)])
async def test_short_steps_run_on_the_loop_thread_long_ones_on_the_engine_thread(
    model, monkeypatch, inline_below, expect_loop_thread
):
    monkeypatch.setattr(async_engine, "INLINE_STEP_SECONDS", inline_below)
    engine = new_engine(model)
    threads: list[str] = []
    step = engine.step

    def recording_step():
        threads.append(threading.current_thread().name)
        return step()

    front = AsyncGuardEngine(StepWrapped(engine, recording_step))
    await front.moderate("c", [100, 101, 102], 0)  # no step measured yet: always the engine thread
    predicted = engine.predicted_step_seconds()
    assert predicted == 0  # nothing queued
    result = await front.moderate("c", [103], 3)
    assert result.start_position == 3
    await front.close()
    first, second = threads
    assert first.startswith("guard-engine")
    assert (second == "MainThread") is expect_loop_thread


def test_predicted_step_time_scales_with_the_queued_tokens(model):
    engine = new_engine(model)
    assert engine.predicted_step_seconds() is None
    engine.submit("a", list(range(100, 110)))
    engine.run_until_idle()
    engine.submit("a", list(range(200, 220)))
    measured = engine.stats().last_step_cpu_seconds
    assert measured > 0
    assert engine.predicted_step_seconds() == pytest.approx(2 * measured)
