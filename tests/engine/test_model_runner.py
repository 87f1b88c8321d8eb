"""How the model runner splits a step's chunks into attention groups by query and key length."""

from __future__ import annotations

import random

import torch

from processor.engine.model_runner import (
    KEY_BLOCKS_UNSPLIT,
    KEY_LENGTH_SPREAD,
    split_by_key_length,
    split_by_query_length,
)
from processor.engine.step_metadata import long_tensor


def test_similar_widths_stay_one_group():
    assert split_by_key_length([5, 7, 6, 7]) == [[0, 2, 1, 3]]
    assert split_by_key_length([1, KEY_BLOCKS_UNSPLIT]) == [[0, 1]]  # narrow groups are not split


def test_one_long_conversation_gets_a_group_of_its_own():
    widths = [7] * 200 + [250]
    assert split_by_key_length(widths) == [list(range(200)), [200]]


def test_every_index_once_and_no_group_wider_than_the_spread_allows():
    rng = random.Random(5)
    for _ in range(200):
        widths = [rng.choice([1, 2, 3, 9, 17, 40, 41, 300]) for _ in range(rng.randint(1, 40))]
        runs = split_by_key_length(widths)
        assert sorted(index for run in runs for index in run) == list(range(len(widths)))
        for run in runs:
            narrowest, widest = min(widths[i] for i in run), max(widths[i] for i in run)
            assert widest <= max(KEY_LENGTH_SPREAD * narrowest, KEY_BLOCKS_UNSPLIT)


def test_no_input_no_groups():
    assert split_by_key_length([]) == []


def test_streaming_chunks_never_share_a_group_with_longer_ones():
    assert split_by_query_length([1, 2, 1, 512, 1]) == [[0, 2, 4], [1], [3]]
    assert split_by_query_length([1, 2, 1, 512, 1], by_powers_of_two=False) == [[0, 2, 4], [1, 3]]


def test_query_classes_cover_every_chunk_once_within_twice_the_shortest():
    rng = random.Random(7)
    for _ in range(200):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 60))]
        classes = split_by_query_length(lengths)
        assert sorted(index for members in classes for index in members) == list(range(len(lengths)))
        for members in classes:
            shortest, longest = min(lengths[i] for i in members), max(lengths[i] for i in members)
            assert longest <= 2 * shortest and (shortest == 1) <= (longest == 1)
        # Classes come shortest first, each holding its members in step order.
        assert all(members == sorted(members) for members in classes)
        assert [max(lengths[i] for i in m) for m in classes] == sorted(
            max(lengths[i] for i in m) for m in classes
        )


def test_long_tensor_equals_torch_tensor():
    values = [0, 1, -7, 2**40, 123456789]
    assert torch.equal(long_tensor(values), torch.tensor(values, dtype=torch.long))
    assert long_tensor([]).dtype == torch.long and long_tensor([]).numel() == 0
