"""The engine's account of which conversations wait: what `has_pending`, the stats and each step's
schedule read, kept beside every conversation it holds (idle ones are never walked)."""

from __future__ import annotations

from processor.engine import ChunkStatus
from processor.model import load_guard_model
from tests.engine.engines import engine_for


def test_waiting_conversations_are_counted_as_work_comes_and_goes(tiny_model_dir):
    model = load_guard_model(tiny_model_dir, device="cpu")
    engine = engine_for(model, 64, max_batch_tokens=16)
    for name in ("a", "b", "c"):
        engine.submit(name, list(range(1000, 1004)))
    engine.submit("a", [1004, 1005])  # a second request behind the first
    engine.submit("huge", list(range(1000, 1100)))  # more than the whole cache: refused in a step
    assert engine.has_pending() and engine.stats().waiting_conversations == 4
    engine.release("b")  # its queued work goes with it
    assert engine.stats().waiting_conversations == 3

    results = engine.step()  # a first request a conversation: a's first and c's; huge refused
    assert {(r.conversation_id, r.status) for r in results} == {
        ("a", ChunkStatus.OK),
        ("c", ChunkStatus.OK),
        ("huge", ChunkStatus.EXCEEDS_CACHE),
    }
    assert engine.stats().waiting_conversations == 1 and engine.has_pending()  # a's second request
    (last,) = engine.run_until_idle()
    assert (last.conversation_id, last.start_position) == ("a", 4)
    assert not engine.has_pending() and engine.stats().waiting_conversations == 0
    engine.submit("c", [1006])
    assert engine.stats().waiting_conversations == 1 and len(engine.run_until_idle()) == 1


def test_a_full_cache_evicts_the_least_recently_used_idle_conversation(tiny_model_dir):
    model = load_guard_model(tiny_model_dir, device="cpu")
    engine = engine_for(model, 32)  # 4 blocks of 8 tokens
    for name in ("a", "b", "c"):
        engine.submit(name, list(range(1000, 1008)))  # one block each
        engine.run_until_idle()
    engine.submit("a", [1008])  # a's second block: a is now the most recently used
    engine.run_until_idle()
    engine.submit("d", list(range(1000, 1008)))  # the cache is full: one idle conversation goes
    engine.run_until_idle()
    assert [engine.next_position(name) for name in "abcd"] == [9, None, 8, 8]
    assert engine.stats().evictions == 1
