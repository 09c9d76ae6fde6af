"""Tests for tulu.engine.kv_cache: block hashing, the BlockPool's bookkeeping and prefix cache,
plan_kv_cache and PagedKVCache."""

from __future__ import annotations

import pytest
import torch

from tulu.engine.kv_cache import (
    BlockPool,
    KVCacheSpec,
    PagedKVCache,
    bytes_per_block,
    hash_block,
    plan_kv_cache,
    prefix_hashes,
)
from tulu.errors import GenerationError
from tulu.model import preset


def small_config(**overrides):
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        torch_dtype="float32",
        max_position_embeddings=256,
    )
    fields.update(overrides)
    return preset("pythia-14m", **fields)


def check_accounting(pool: BlockPool) -> None:
    """free + evictable + in use == all blocks, each block in exactly one state."""
    in_use = {b for b in range(pool.num_blocks) if pool.ref_count[b] > 0}
    free = list(pool._free)
    evictable = list(pool._evictable)
    assert len(free) == len(set(free))
    assert not (set(free) & set(evictable))
    assert not (in_use & (set(free) | set(evictable)))
    assert len(in_use) + len(free) + len(evictable) == pool.num_blocks
    assert pool.num_free == len(free) + len(evictable)
    assert pool.num_used == len(in_use)
    assert pool.num_cached == len(evictable)
    assert all(c >= 0 for c in pool.ref_count)


# ----------------------------------------------------------------------------------------------
# Hashing
# ----------------------------------------------------------------------------------------------


def test_prefix_hashes_cover_only_full_blocks():
    tokens = list(range(10))
    assert len(prefix_hashes(tokens, 4)) == 2
    assert len(prefix_hashes(tokens, 5)) == 2
    assert len(prefix_hashes(tokens, 10)) == 1
    assert prefix_hashes(tokens, 11) == []
    assert prefix_hashes([], 4) == []
    assert len(prefix_hashes(tokens, 1)) == 10


def test_prefix_hashes_are_a_chain_of_hash_block():
    tokens = [5, 9, 2, 7, 1, 1, 3, 8, 4]
    h0 = hash_block(None, tokens[0:3])
    h1 = hash_block(h0, tokens[3:6])
    h2 = hash_block(h1, tokens[6:9])
    assert prefix_hashes(tokens, 3) == [h0, h1, h2]
    assert prefix_hashes(tokens + [6, 6], 3) == [h0, h1, h2]  # a partial tail adds nothing


def test_hash_depends_on_the_whole_prefix():
    a = [1, 2, 3, 4, 10, 11, 12, 13]
    b = [1, 2, 3, 5, 10, 11, 12, 13]  # same second block, different first block
    ha, hb = prefix_hashes(a, 4), prefix_hashes(b, 4)
    assert ha[0] != hb[0]
    assert ha[1] != hb[1]
    assert hash_block(None, a[4:]) == hash_block(None, b[4:])  # only the chain tells them apart


def test_hash_is_deterministic_and_token_exact():
    assert hash_block(None, [1, 2, 3]) == hash_block(None, [1, 2, 3])
    assert hash_block(None, [1, 23]) != hash_block(None, [12, 3])
    assert hash_block(None, [1, 2, 3]) != hash_block(None, [3, 2, 1])
    parent = hash_block(None, [0])
    assert hash_block(parent, [1, 2]) != hash_block(None, [1, 2])
    assert isinstance(parent, bytes) and len(parent) == 16


# ----------------------------------------------------------------------------------------------
# Allocation and reference counts
# ----------------------------------------------------------------------------------------------


def test_pool_rejects_empty_shapes():
    with pytest.raises(GenerationError, match="0 x 4"):
        BlockPool(0, 4)
    with pytest.raises(GenerationError):
        BlockPool(4, 0)


def test_allocate_and_release():
    pool = BlockPool(4, 2)
    assert (pool.num_free, pool.num_used, pool.num_cached) == (4, 0, 0)
    blocks = [pool.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3]
    assert all(pool.ref_count[b] == 1 for b in blocks)
    assert (pool.num_free, pool.num_used) == (0, 4)
    check_accounting(pool)
    with pytest.raises(GenerationError, match="out of blocks"):
        pool.allocate()
    pool.release(blocks[1])
    assert (pool.num_free, pool.num_used) == (1, 3)
    assert pool.allocate() == blocks[1]  # the only free block
    pool.release_all(blocks)
    assert (pool.num_free, pool.num_used, pool.num_cached) == (4, 0, 0)
    check_accounting(pool)


def test_release_of_an_unowned_block_raises():
    pool = BlockPool(3, 2)
    with pytest.raises(RuntimeError, match="block 1"):
        pool.release(1)
    block = pool.allocate()
    pool.release(block)
    with pytest.raises(RuntimeError, match=f"block {block}"):
        pool.release(block)
    check_accounting(pool)
    assert pool.num_used == 0


def test_shared_block_is_freed_by_its_last_reference():
    pool = BlockPool(2, 4)
    block = pool.allocate()
    h = hash_block(None, [1, 2, 3, 4])
    pool.register(block, h)
    assert pool.lookup(h) == block  # a second owner
    assert pool.ref_count[block] == 2
    pool.release(block)
    assert pool.ref_count[block] == 1 and pool.num_used == 1 and pool.num_cached == 0
    pool.release(block)
    assert pool.ref_count[block] == 0 and pool.num_used == 0 and pool.num_cached == 1
    check_accounting(pool)


# ----------------------------------------------------------------------------------------------
# Prefix cache
# ----------------------------------------------------------------------------------------------


def fill(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate a block per full block of `tokens` and register its prefix hash."""
    blocks = []
    for h in prefix_hashes(tokens, pool.block_size):
        block = pool.allocate()
        pool.register(block, h)
        blocks.append(block)
    return blocks


def test_registered_block_is_found_after_release():
    pool = BlockPool(8, 4)
    tokens = list(range(12))
    blocks = fill(pool, tokens)
    pool.release_all(blocks)
    assert pool.num_used == 0 and pool.num_cached == 3 and pool.num_free == 8
    hits = [pool.lookup(h) for h in prefix_hashes(tokens, 4)]
    assert hits == blocks
    assert pool.num_used == 3 and pool.num_cached == 0
    assert pool.lookup(hash_block(None, [99, 99, 99, 99])) is None
    pool.release_all(hits)
    check_accounting(pool)


def test_cached_block_is_reused_only_for_an_identical_full_prefix():
    pool = BlockPool(8, 4)
    first = [1, 2, 3, 4, 10, 11, 12, 13]
    pool.release_all(fill(pool, first))
    other = [1, 2, 3, 5, 10, 11, 12, 13]  # block 2 has the same tokens, block 1 differs
    h_other = prefix_hashes(other, 4)
    assert not pool.peek(h_other[0]) and not pool.peek(h_other[1])
    assert pool.lookup(h_other[1]) is None
    assert pool.lookup(h_other[0]) is None
    # A prompt that extends the first one reuses both blocks.
    extended = first + [20, 21, 22, 23]
    h_ext = prefix_hashes(extended, 4)
    assert pool.peek(h_ext[0]) and pool.peek(h_ext[1]) and not pool.peek(h_ext[2])
    got = [pool.lookup(h) for h in h_ext[:2]]
    assert None not in got
    pool.release_all(got)
    check_accounting(pool)


def test_lru_eviction_oldest_first_and_free_blocks_before_cached_ones():
    pool = BlockPool(4, 1)
    hashes = prefix_hashes([10, 20, 30], 1)
    a, b, c = fill(pool, [10, 20, 30])
    d = pool.allocate()  # never registered
    pool.release(a)
    pool.release(b)
    pool.release(c)
    pool.release(d)
    assert pool.num_cached == 3 and pool.num_free == 4
    assert pool.allocate() == d  # a free block is taken before evicting anything
    assert all(pool.peek(h) for h in hashes)
    assert pool.allocate() == a  # then the least recently used cached block
    assert not pool.peek(hashes[0]) and pool.peek(hashes[1]) and pool.peek(hashes[2])
    # A hit refreshes b: released again it becomes the most recently used.
    assert pool.lookup(hashes[1]) == b
    pool.release(b)
    assert pool.allocate() == c
    assert pool.lookup(hashes[2]) is None
    assert pool.lookup(hashes[1]) == b
    check_accounting(pool)


def test_release_all_evicts_the_deepest_block_of_a_sequence_first():
    pool = BlockPool(3, 2)
    tokens = [1, 2, 3, 4, 5, 6]
    hashes = prefix_hashes(tokens, 2)
    blocks = fill(pool, tokens)
    pool.release_all(blocks)
    assert pool.allocate() == blocks[2]
    assert pool.peek(hashes[0]) and pool.peek(hashes[1]) and not pool.peek(hashes[2])
    assert pool.allocate() == blocks[1]
    assert pool.peek(hashes[0])


def test_duplicate_registration_keeps_the_first_block():
    pool = BlockPool(4, 2)
    h = hash_block(None, [7, 7])
    first, second = pool.allocate(), pool.allocate()
    pool.register(first, h)
    pool.register(second, h)
    pool.release(second)  # not findable: goes straight to the free list
    assert pool.num_cached == 0
    pool.release(first)
    assert pool.num_cached == 1
    assert pool.lookup(h) == first
    pool.release(first)
    # Registering a block a second time under another hash is ignored.
    block = pool.lookup(h)
    pool.register(block, hash_block(None, [8, 8]))
    assert not pool.peek(hash_block(None, [8, 8]))
    pool.release(block)
    check_accounting(pool)


def test_reset_prefix_cache_forgets_everything_but_keeps_blocks_in_use():
    pool = BlockPool(6, 2)
    kept = fill(pool, [1, 2, 3, 4])
    dropped = fill(pool, [5, 6, 7, 8])
    pool.release_all(dropped)
    assert pool.num_cached == 2
    pool.reset_prefix_cache()
    assert pool.num_cached == 0 and pool.num_free == 4 and pool.num_used == 2
    for h in prefix_hashes([1, 2, 3, 4], 2) + prefix_hashes([5, 6, 7, 8], 2):
        assert not pool.peek(h)
        assert pool.lookup(h) is None
    assert all(pool.ref_count[b] == 1 for b in kept)
    pool.release_all(kept)
    assert pool.num_cached == 0 and pool.num_free == 6  # forgotten: released to the free list
    check_accounting(pool)


def test_disabled_prefix_caching_never_registers_or_hits():
    pool = BlockPool(4, 2, enable_prefix_caching=False)
    h = hash_block(None, [1, 2])
    block = pool.allocate()
    pool.register(block, h)
    pool.release(block)
    assert pool.num_cached == 0
    assert not pool.peek(h)
    assert pool.lookup(h) is None
    check_accounting(pool)


def test_random_operations_keep_the_accounting_consistent():
    gen = torch.Generator().manual_seed(0)
    pool = BlockPool(16, 2)
    owned: list[int] = []
    hashes = [hash_block(None, [i, i]) for i in range(24)]
    for _ in range(2000):
        op = int(torch.randint(0, 4, (1,), generator=gen))
        if op == 0 and pool.num_free:
            block = pool.allocate()
            owned.append(block)
            if int(torch.randint(0, 2, (1,), generator=gen)):
                pool.register(block, hashes[int(torch.randint(0, 24, (1,), generator=gen))])
        elif op == 1 and owned:
            pool.release(owned.pop(int(torch.randint(0, len(owned), (1,), generator=gen))))
        elif op == 2:
            block = pool.lookup(hashes[int(torch.randint(0, 24, (1,), generator=gen))])
            if block is not None:
                owned.append(block)
        elif op == 3 and int(torch.randint(0, 50, (1,), generator=gen)) == 0:
            pool.reset_prefix_cache()
        check_accounting(pool)
        assert sorted(b for b in range(16) for _ in range(pool.ref_count[b])) == sorted(owned)
        for block, h in pool._hash_of.items():
            assert pool._block_of.get(h, block) == block
    pool.release_all(owned)
    assert pool.num_used == 0


# ----------------------------------------------------------------------------------------------
# Sizing and tensors
# ----------------------------------------------------------------------------------------------


def test_plan_kv_cache_with_an_explicit_budget():
    config = small_config()
    per_token = 2 * 2 * 64 * 4  # K and V, 2 layers, hidden 64, float32
    assert config.kv_cache_bytes_per_token(torch.float32) == per_token
    assert bytes_per_block(config, 16, torch.float32) == 16 * per_token
    spec = plan_kv_cache(config, torch.float32, torch.device("cpu"), 16, kv_cache_bytes=100_000)
    assert spec == KVCacheSpec(100_000 // (16 * per_token), 16)
    assert spec.num_blocks == 6 and spec.num_tokens == 96
    half = plan_kv_cache(config, torch.bfloat16, torch.device("cpu"), 16, kv_cache_bytes=100_000)
    assert half.num_blocks == 12  # two bytes per element: twice the blocks
    exact = plan_kv_cache(
        config, torch.float32, torch.device("cpu"), 4, kv_cache_bytes=4 * per_token
    )
    assert exact.num_blocks == 1


def test_plan_kv_cache_budget_smaller_than_a_block_is_an_error():
    config = small_config()
    with pytest.raises(GenerationError, match=r"1,000 bytes.*16,384 bytes for 16 tokens"):
        plan_kv_cache(config, torch.float32, torch.device("cpu"), 16, kv_cache_bytes=1000)
    with pytest.raises(GenerationError):
        plan_kv_cache(config, torch.float32, torch.device("cpu"), 16, kv_cache_bytes=16 * 1024 - 1)


def test_plan_kv_cache_cpu_default_holds_sixteen_contexts():
    config = small_config(max_position_embeddings=128)
    spec = plan_kv_cache(config, torch.float32, torch.device("cpu"), 16)
    assert spec.num_tokens == 16 * 128


def test_plan_kv_cache_on_cuda_takes_the_fraction_of_free_memory(monkeypatch):
    """The GPU default (no --kv-cache-gb): --gpu-memory-utilization of the memory free once
    the weights are loaded, asked of the device the cache goes to (no GPU here: faked)."""
    config = small_config()
    asked: list[torch.device] = []
    free = 10 * 2**20 + 123  # bytes; total is ignored

    def mem_get_info(device):
        asked.append(device)
        return free, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    device = torch.device("cuda", 1)
    per_block = bytes_per_block(config, 16, torch.bfloat16)
    for fraction in (0.9, 0.5, 1.0):
        spec = plan_kv_cache(config, torch.bfloat16, device, 16, memory_fraction=fraction)
        assert spec.num_blocks == int(free * fraction) // per_block
    assert asked == [device] * 3
    # An explicit budget wins, and the device is not asked.
    assert (
        plan_kv_cache(config, torch.bfloat16, device, 16, kv_cache_bytes=per_block).num_blocks == 1
    )
    assert len(asked) == 3


def test_paged_kv_cache_shape_and_size():
    config = small_config()
    spec = KVCacheSpec(num_blocks=5, block_size=8)
    cache = PagedKVCache(config, spec, torch.float32, "cpu")
    assert cache.keys.shape == (2, 5, 8, 4, 16)
    assert cache.values.shape == cache.keys.shape
    assert cache.nbytes == 5 * bytes_per_block(config, 8, torch.float32)
    assert (cache.block_size, cache.num_blocks) == (8, 5)
