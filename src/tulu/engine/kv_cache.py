"""Paged KV cache: a fixed pool of blocks, per-sequence block tables, prefix caching.

Memory for keys and values is one pair of tensors per model, `[layers, blocks, block_size,
heads, head_size]`, allocated once at start-up. A sequence owns a list of block ids (its block
table); token position p lives in block `table[p // block_size]`, row `p % block_size`.

Prefix caching: when a block is full, its contents are identified by a chained digest of every
token up to its end (so two blocks match only if their whole prefixes match). A new request
whose prompt starts with cached blocks reuses them instead of recomputing. Blocks nobody uses
any more keep their contents and stay findable until the space is needed (LRU eviction).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tulu.errors import GenerationError
from tulu.model.config import NeoXConfig

BlockHash = bytes


def hash_block(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """Digest of a full block given its parent's digest: identifies the whole prefix."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(b",".join(str(t).encode() for t in tokens))
    return digest.digest()


def prefix_hashes(tokens: Sequence[int], block_size: int) -> list[BlockHash]:
    """Digests of every full block of `tokens`."""
    hashes: list[BlockHash] = []
    parent = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return hashes


class BlockPool:
    """Block bookkeeping (no tensors): reference counts, free list, prefix-cache index.

    A block is in exactly one of three states:
    - in use: ref_count > 0 (shared blocks have ref_count > 1);
    - cached: ref_count == 0 but holding a registered prefix; reusable by a hit, evictable;
    - free: ref_count == 0 and holding nothing useful.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise GenerationError(
                f"KV cache needs >= 1 block of >= 1 token (got {num_blocks} x {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU order, oldest first
        self._hash_of: dict[int, BlockHash] = {}
        self._block_of: dict[BlockHash, int] = {}

    # ---------------------------------------------------------------- accounting
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._evictable)

    # ---------------------------------------------------------------- allocation
    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
        else:
            raise GenerationError("KV cache is out of blocks")  # callers check num_free first
        self.ref_count[block] = 1
        return block

    def release(self, block: int) -> None:
        """Drop one reference; an unreferenced block stays findable if it holds a prefix."""
        if self.ref_count[block] <= 0:
            raise RuntimeError(f"block {block} released more often than it was taken")
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def release_all(self, blocks: Sequence[int]) -> None:
        # Release the tail first so that, among one sequence's blocks, the deepest (least
        # shareable) are evicted first.
        for block in reversed(blocks):
            self.release(block)

    # ---------------------------------------------------------------- prefix cache
    def lookup(self, block_hash: BlockHash) -> int | None:
        """Take a reference to the cached block holding this prefix, if any."""
        if not self.enable_prefix_caching:
            return None
        block = self._block_of.get(block_hash)
        if block is None:
            return None
        if self.ref_count[block] == 0:
            del self._evictable[block]
        self.ref_count[block] += 1
        return block

    def share(self, block: int) -> None:
        """Take another reference to a block in use (one a running sequence is filling)."""
        if self.ref_count[block] <= 0:
            raise RuntimeError(f"block {block} is not in use: nothing to share")
        self.ref_count[block] += 1

    def peek(self, block_hash: BlockHash) -> bool:
        return self.enable_prefix_caching and block_hash in self._block_of

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Record that a (now full) block holds this prefix."""
        if not self.enable_prefix_caching or block in self._hash_of:
            return
        if block_hash in self._block_of:
            return  # an identical block is already cached; keep the first one findable
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block

    def _forget(self, block: int) -> None:
        block_hash = self._hash_of.pop(block, None)
        if block_hash is not None and self._block_of.get(block_hash) == block:
            del self._block_of[block_hash]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents)."""
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self._free.append(block)
        self._hash_of.clear()
        self._block_of.clear()


@dataclass
class KVCacheSpec:
    num_blocks: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def bytes_per_block(config: NeoXConfig, block_size: int, dtype: torch.dtype) -> int:
    return config.kv_cache_bytes_per_token(dtype) * block_size


def plan_kv_cache(
    config: NeoXConfig,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    kv_cache_bytes: int | None = None,
    memory_fraction: float = 0.9,
) -> KVCacheSpec:
    """How many blocks fit: an explicit byte budget, or a fraction of free device memory.

    On CUDA the default takes `memory_fraction` of the memory that is free after the weights
    are loaded (as vLLM's gpu_memory_utilization does, but of free rather than total memory).
    On CPU, without a budget, it sizes the pool for 16 full-context sequences.
    """
    per_block = bytes_per_block(config, block_size, dtype)
    if kv_cache_bytes is None:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            kv_cache_bytes = int(free * memory_fraction)
        else:
            kv_cache_bytes = (
                16 * config.max_position_embeddings * config.kv_cache_bytes_per_token(dtype)
            )
    num_blocks = kv_cache_bytes // per_block
    if num_blocks < 1:
        raise GenerationError(
            f"the KV cache budget of {kv_cache_bytes:,} bytes is smaller than one block "
            f"({per_block:,} bytes for {block_size} tokens)"
        )
    return KVCacheSpec(int(num_blocks), block_size)


class PagedKVCache:
    """The key and value tensors of every layer, addressed by block."""

    def __init__(
        self,
        config: NeoXConfig,
        spec: KVCacheSpec,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (
            config.num_hidden_layers,
            spec.num_blocks,
            spec.block_size,
            config.num_attention_heads,
            config.head_size,
        )
        wanted = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        too_big = GenerationError(
            f"the KV cache of {spec.num_blocks} blocks ({wanted / 2**30:.2f} GiB) does not "
            f"fit in the free memory of {device}; ask for less (--kv-cache-gb)"
        )
        if wanted >= 2**63:  # beyond what torch can even size: its RuntimeError or TypeError
            raise too_big
        try:
            self.keys = torch.zeros(shape, dtype=dtype, device=device)
            self.values = torch.zeros(shape, dtype=dtype, device=device)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            # An explicit kv_cache_bytes (--kv-cache-gb) larger than what is free: say so,
            # rather than the allocator's report (a RuntimeError on the CPU).
            if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
                raise
            self.keys = self.values = None  # type: ignore[assignment]
            raise too_big from None
        self.block_size = spec.block_size
        self.num_blocks = spec.num_blocks

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2
