"""The slot KV cache's compaction when rows finish: the survivors' keys and values, in the order it returns."""

from __future__ import annotations

import itertools

import torch

from atlas_rl.rollout.kv_cache import SlotKVCache, fill_holes


def test_fill_holes_packs_every_subset_with_the_fewest_moves():
    for n in range(1, 7):
        for m in range(n + 1):
            for keep in map(list, itertools.combinations(range(n), m)):
                order = fill_holes(keep)
                assert sorted(order) == keep  # every survivor exactly once
                moved = sum(i != j for i, j in enumerate(order))
                assert moved == sum(j >= m for j in keep)  # one move per hole in the packed range, no more
                assert all(order[i] == i for i in range(m) if i in keep)  # survivors in the range stay put


def test_compact_moves_the_survivors_rows_to_the_order_it_returns():
    torch.manual_seed(0)
    cache = SlotKVCache(2, 6, 5, 2, 3, torch.float32, torch.device("cpu"))
    cache.keys.normal_()
    cache.values.normal_()
    before_k, before_v = cache.keys.clone(), cache.values.clone()
    keep = [0, 2, 4, 5]  # slots 1 and 3 finished
    order = cache.compact(keep, 4)
    assert order == [0, 4, 2, 5]
    for i, j in enumerate(order):
        assert torch.equal(cache.keys[:, i, :, :4], before_k[:, j, :, :4])
        assert torch.equal(cache.values[:, i, :, :4], before_v[:, j, :, :4])
