"""The paged KV cache: a pool of fixed-size blocks, per-request block tables, prefix caching, and the KVStore that
lets the model attend over the pool for one batched step.

Layers are split into **groups** of the same attention kind (gpt-oss: the sliding-window layers and the full-attention
layers; vLLM's "hybrid allocator"). Every request has one block table per group, so a sliding group can return the
blocks that fell wholly out of its window while the full group keeps the whole sequence. The groups share one pool
of block ids: block b is `num_slots` tensors deep (slot j holds layer j of whichever group owns b now), so memory a
sliding layer gives back serves any group.

Prefix caching: a full block is named by a hash chain over its tokens and all before it, started from the request's
LoRA adapter (`Request.cache_salt`); the pool maps (group, hash) -> block. A new request reuses its longest cached
prefix whose blocks every group still holds: the full groups need every leading block, a sliding group only the
blocks inside the window of the first recomputed token (so a sliding layer that dropped its early blocks never blocks
a hit, and never has to donate them). Reused blocks are reference-counted; a block whose count falls to zero keeps its
hash in an LRU free queue and is evicted only when a fresh block is needed.
"""

from __future__ import annotations

import math
import mmap
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gptoss_cluster.kernels.dispatch import Kernels
from gptoss_cluster.workers.block_hash import hash_block
from gptoss_cluster.workers.config import ModelConfig
from gptoss_cluster.workers.engine.config import EngineConfig
from gptoss_cluster.workers.engine.request import Request


# ---------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class KVCacheGroup:
    layers: tuple[int, ...]
    sliding_window: int | None  # None: full attention


@dataclass(frozen=True)
class KVCacheLayout:
    """Which layers share a block table, and which pool tensor (slot) each layer uses."""

    block_size: int
    groups: tuple[KVCacheGroup, ...]
    layer_group: tuple[int, ...]
    layer_slot: tuple[int, ...]

    @classmethod
    def from_model_config(cls, config: ModelConfig, block_size: int) -> KVCacheLayout:
        by_window: dict[int | None, list[int]] = {}
        for layer in range(config.num_hidden_layers):
            window = config.sliding_window if config.is_sliding(layer) else None
            by_window.setdefault(window, []).append(layer)
        groups = tuple(KVCacheGroup(tuple(layers), window) for window, layers in by_window.items())
        layer_group, layer_slot = [0] * config.num_hidden_layers, [0] * config.num_hidden_layers
        for g, group in enumerate(groups):
            for slot, layer in enumerate(group.layers):
                layer_group[layer], layer_slot[layer] = g, slot
        return cls(block_size, groups, tuple(layer_group), tuple(layer_slot))

    @property
    def num_slots(self) -> int:
        return max(len(g.layers) for g in self.groups)

    def block_bytes(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one block id across every slot, keys and values (one shard's KV heads)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.num_slots * 2 * self.block_size * num_kv_heads * head_dim * itemsize

    def blocks_needed(self, num_tokens: int, max_chunk: int) -> int:
        """Most blocks one request of `num_tokens` computed tokens can hold at once (steps of <= max_chunk tokens)."""
        bs = self.block_size
        full = -(-num_tokens // bs)
        total = 0
        for group in self.groups:
            if group.sliding_window is None:
                total += full
            else:  # the window behind the step's first query, plus the step's own tokens, on block boundaries
                total += min(full, (min(max_chunk, num_tokens) + group.sliding_window - 1) // bs + 2)
        return total


# ---------------------------------------------------------------------------------------------------- the pool
def kv_pool_blocks(config: EngineConfig, layout: KVCacheLayout, max_model_len: int, block_bytes: int,
                   device_type: str, free_bytes: Callable[[], int]) -> int:
    """How many block ids the pool gets, each `block_bytes` on the most loaded device (the sizing of every
    executor, local or Ray shards).

    An explicit `config.num_blocks` wins. On an accelerator the pool takes `kv_memory_fraction` of its free memory
    (as vLLM's gpu_memory_utilization: that memory has no other tenant). On CPU the pool shares RAM with the
    weights, other replicas and everything else on the node, so it gets no more than the engine can fill at once
    (`max_num_seqs` sequences of `max_model_len` tokens, counting each layer group's blocks: a sliding group holds
    only its window), within `cpu_kv_space_gib` (vLLM's VLLM_CPU_KVCACHE_SPACE) and `kv_memory_fraction` of the
    free memory. `free_bytes` is called only when the pool is sized from memory (on Ray it asks every shard).
    """
    if config.num_blocks is not None:
        return config.num_blocks
    by_memory = int(config.kv_memory_fraction * free_bytes()) // block_bytes
    if by_memory < 1:
        raise ValueError(f"kv_memory_fraction {config.kv_memory_fraction} of the free memory holds no KV block of "
                         f"{block_bytes} bytes")
    if device_type != "cpu":
        return by_memory
    budget = int(config.cpu_kv_space_gib * 2**30) // block_bytes
    if budget < 1:
        raise ValueError(f"cpu_kv_space_gib {config.cpu_kv_space_gib} holds no KV block of {block_bytes} bytes")
    need = config.max_num_seqs * layout.blocks_needed(max_model_len, config.max_num_batched_tokens)
    return min(need, budget, by_memory)


def allocate_kv_pools(layout: KVCacheLayout, num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device | str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed key and value pools, one [num_blocks, block_size, Hkv, D] tensor per slot (zeros: masked keys of a
    gathered block multiply into the output as 0, never as NaN)."""
    shape = (num_blocks, layout.block_size, num_kv_heads, head_dim)
    keys = [_zeros(shape, dtype, device) for _ in range(layout.num_slots)]
    values = [_zeros(shape, dtype, device) for _ in range(layout.num_slots)]
    return keys, values


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    # A fresh private anonymous mapping reads as zeros and takes RAM only as its pages are first written, so a CPU
    # pool costs what requests have filled so far, not its full size (torch.zeros would write every page now).
    # The tensor keeps the mapping alive.
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype).view(shape)


# ---------------------------------------------------------------------------------------------------- block pool
class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "key")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.key: tuple[int, bytes] | None = None  # (group, hash) while its content is registered in the cache

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.key is not None})"


class BlockPool:
    """Block ids with reference counts, an LRU queue of free blocks, and the (group, hash) -> block map."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)  # front: evict next
        self.cached: dict[tuple[int, bytes], KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free)} free")
        out = []
        for _ in range(n):
            _, block = self.free.popitem(last=False)
            if block.key is not None:  # evict its cached content
                if self.cached.get(block.key) is block:
                    del self.cached[block.key]
                block.key = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Sequence[KVBlock]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Sequence[KVBlock]) -> None:
        """Drop a reference on each block; blocks reaching zero join the free queue in this order (first = evicted
        first)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free[block.block_id] = block
            elif block.ref_cnt < 0:
                raise RuntimeError(f"{block} released more often than taken")

    def lookup(self, group: int, block_hash: bytes) -> KVBlock | None:
        return self.cached.get((group, block_hash))

    def register(self, block: KVBlock, group: int, block_hash: bytes) -> None:
        key = (group, block_hash)
        if block.key is None and key not in self.cached:  # a twin computed earlier stays the cached copy
            self.cached[key] = block
            block.key = key

    def reset_prefix_cache(self) -> int:
        """Forget the content of every free block (blocks in use keep theirs); returns how many were dropped."""
        dropped = 0
        for block in self.free.values():
            if block.key is not None:
                if self.cached.get(block.key) is block:
                    del self.cached[block.key]
                block.key = None
                dropped += 1
        return dropped


# ---------------------------------------------------------------------------------------------------- manager
@dataclass
class PrefixHit:
    num_tokens: int
    blocks: list[list[KVBlock | None]]  # per group, one entry per leading block (None: outside a sliding window)


class _Tables:
    """One request's block tables, a block-id mirror of each (what the executor reads), and per-group cursors."""

    __slots__ = ("blocks", "ids", "released", "registered")

    def __init__(self, num_groups: int) -> None:
        self.blocks: list[list[KVBlock | None]] = [[] for _ in range(num_groups)]
        self.ids: list[list[int]] = [[] for _ in range(num_groups)]
        self.released = [0] * num_groups  # blocks below this index of a sliding group were returned to the pool
        self.registered = [0] * num_groups  # blocks below this index were offered to the prefix cache


class KVCacheManager:
    def __init__(self, layout: KVCacheLayout, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self._tables: dict[Request, _Tables] = {}
        self._full_groups = [g for g, grp in enumerate(layout.groups) if grp.sliding_window is None]
        self._sliding_groups = [g for g, grp in enumerate(layout.groups) if grp.sliding_window is not None]
        # counters (tokens, and requests)
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.prefix_query_requests = 0
        self.prefix_hit_requests = 0

    # ------------------------------------------------------------------------------------------------ capacity
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def holds(self, request: Request) -> bool:
        return request in self._tables

    # ------------------------------------------------------------------------------------------------ hashing
    def block_hashes(self, request: Request) -> list[bytes]:
        """The hash chain of every full block of the request's tokens (extended as tokens arrive); it starts from the
        request's `cache_salt`, so requests of different LoRA adapters never share a block (base: b"")."""
        bs, hashes, tokens = self.block_size, request.block_hashes, request.token_ids
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(hash_block(hashes[-1] if i else request.cache_salt, tokens[i * bs:(i + 1) * bs]))
        return hashes

    # ------------------------------------------------------------------------------------------------ prefix hits
    def find_prefix(self, request: Request) -> PrefixHit | None:
        """The longest cached prefix usable by `request` (which holds no blocks yet); None when nothing is cached.

        At least one token is always left to compute: the step that computes it produces the next token's logits.
        """
        if not self.enable_prefix_caching or not self.pool.cached:
            return None
        bs, lookup = self.block_size, self.pool.lookup
        hashes = self.block_hashes(request)
        n = min(len(hashes), (request.num_tokens - 1) // bs)
        for g in self._full_groups:
            k = 0
            while k < n and lookup(g, hashes[k]) is not None:
                k += 1
            n = k
        if self._sliding_groups and n:
            # A prefix of m blocks is usable by a sliding group when the blocks inside the window of the first
            # recomputed token (position m * bs) are cached; the full groups allow every m <= n.
            usable = [True] * (n + 1)
            for g in self._sliding_groups:
                window = self.layout.groups[g].sliding_window
                run = 0  # cached blocks in a row ending at block m - 1
                for m in range(1, n + 1):
                    run = run + 1 if lookup(g, hashes[m - 1]) is not None else 0
                    lo = max(0, m * bs - window + 1) // bs
                    usable[m] = usable[m] and run >= m - lo
            n = max(m for m in range(n + 1) if usable[m])
        if n == 0:
            return None
        blocks: list[list[KVBlock | None]] = []
        for g, group in enumerate(self.layout.groups):
            lo = 0 if group.sliding_window is None else max(0, n * bs - group.sliding_window + 1) // bs
            blocks.append([None] * lo + [lookup(g, hashes[j]) for j in range(lo, n)])
        return PrefixHit(n * bs, blocks)

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_query_tokens += num_query_tokens
        self.prefix_hit_tokens += num_hit_tokens
        self.prefix_query_requests += 1
        self.prefix_hit_requests += num_hit_tokens > 0

    # ------------------------------------------------------------------------------------------------ allocation
    def allocate_slots(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Make the tables cover `num_new_tokens` more tokens after what the request (plus `hit`) has computed.

        Sliding groups first give back blocks their next query can no longer see. Returns False, changing nothing
        else, when the pool cannot supply the blocks (the scheduler then preempts or waits).
        """
        bs = self.block_size
        tables = self._tables.get(request)
        num_computed = request.num_computed_tokens + (hit.num_tokens if hit else 0)
        if tables is not None:
            self._release_out_of_window(tables, num_computed)
        need = -(-(num_computed + num_new_tokens) // bs)
        fresh = []
        touch_free = 0
        for g in range(len(self.layout.groups)):
            have = len(tables.blocks[g]) if tables is not None else 0
            if hit is not None:
                have += len(hit.blocks[g])
                touch_free += sum(1 for b in hit.blocks[g] if b is not None and b.ref_cnt == 0)
            fresh.append(max(0, need - have))
        if sum(fresh) + touch_free > self.pool.num_free:
            return False
        if tables is None:
            tables = self._tables[request] = _Tables(len(self.layout.groups))
        if hit is not None:
            # Every group's hit blocks are taken before any fresh block is allocated. A cached block with no
            # reference sits in the free queue, and the pool hands out (and evicts) the front of that queue: taking
            # group g's hit only when its turn came let the fresh blocks of an earlier group take it first (evicted,
            # to be overwritten by this request's new tokens) while group g then used it as its cached prefix, so a
            # tight pool with prefix caching fed wrong keys/values to the attention (greedy tokens changed).
            for hit_blocks in hit.blocks:
                self.pool.touch([b for b in hit_blocks if b is not None])
        for g, group in enumerate(self.layout.groups):
            blocks, ids = tables.blocks[g], tables.ids[g]
            if hit is not None:
                hit_blocks = hit.blocks[g]
                blocks.extend(hit_blocks)
                ids.extend(0 if b is None else b.block_id for b in hit_blocks)
                if group.sliding_window is not None:
                    tables.released[g] = sum(1 for b in hit_blocks if b is None)
                tables.registered[g] = len(hit_blocks)
            if fresh[g]:
                new = self.pool.allocate(fresh[g])
                blocks.extend(new)
                ids.extend(b.block_id for b in new)
        return True

    def _release_out_of_window(self, tables: _Tables, num_computed: int) -> None:
        bs = self.block_size
        for g in self._sliding_groups:
            window = self.layout.groups[g].sliding_window
            first_needed = max(0, num_computed - window + 1) // bs  # the next query sees nothing before this block
            blocks = tables.blocks[g]
            stop = min(first_needed, len(blocks))
            if stop <= tables.released[g]:
                continue
            gone = []
            for j in range(tables.released[g], stop):
                if blocks[j] is not None:
                    gone.append(blocks[j])
                    blocks[j] = None
            tables.released[g] = stop
            self.pool.release(gone)

    def register_computed(self, request: Request) -> None:
        """Offer the request's newly completed full blocks to the prefix cache (after a step computed them)."""
        if not self.enable_prefix_caching:
            return
        tables = self._tables.get(request)
        if tables is None:
            return
        n_full = request.num_computed_tokens // self.block_size
        if n_full <= min(tables.registered):
            return
        hashes = self.block_hashes(request)
        for g in range(len(self.layout.groups)):
            blocks = tables.blocks[g]
            for j in range(tables.registered[g], min(n_full, len(blocks))):
                if blocks[j] is not None:
                    self.pool.register(blocks[j], g, hashes[j])
            tables.registered[g] = max(tables.registered[g], n_full)

    def free(self, request: Request) -> None:
        """Return every block the request holds. The last blocks go first into the free queue, every group's block
        j before any group's block j - 1, so eviction eats prefixes from their tails, evenly across the groups."""
        tables = self._tables.pop(request, None)
        if tables is None:
            return
        longest = max(len(blocks) for blocks in tables.blocks)
        gone = [blocks[j] for j in range(longest - 1, -1, -1) for blocks in tables.blocks
                if j < len(blocks) and blocks[j] is not None]
        self.pool.release(gone)

    def block_ids(self, request: Request, group: int) -> list[int]:
        return self._tables[request].ids[group]

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_prefix_cache()

    def check(self) -> None:
        """Assert the bookkeeping is consistent: reference counts equal table references, free <=> unreferenced, no
        block in two groups' tables (a block's slots hold the layers of one group)."""
        refs = [0] * self.pool.num_blocks
        owner: dict[int, int] = {}  # block id -> the one group whose tables hold it
        for tables in self._tables.values():
            for g, blocks in enumerate(tables.blocks):
                for j, b in enumerate(blocks):
                    if b is not None:
                        refs[b.block_id] += 1
                        assert tables.ids[g][j] == b.block_id
                        assert owner.setdefault(b.block_id, g) == g, (b, "in the tables of two groups")
        for block in self.pool.blocks:
            assert block.ref_cnt == refs[block.block_id], (block, refs[block.block_id])
            assert (block.ref_cnt == 0) == (block.block_id in self.pool.free), block
        for key, block in self.pool.cached.items():
            assert block.key == key


# ---------------------------------------------------------------------------------------------------- KV store
class PagedKVStore:
    """The model's KVStore for one batched step over the paged pools.

    `slot_mappings[g]` [T] gives the flat slot (block_id * block_size + offset) of each new token in group g;
    `block_tables[g]` [B, max_blocks], `query_start_loc` [B + 1] and `seq_lens` [B] describe the batch for
    `kernels.paged_attention`.
    """

    def __init__(self, layout: KVCacheLayout, key_pools: list[torch.Tensor], value_pools: list[torch.Tensor],
                 slot_mappings: Sequence[torch.Tensor], block_tables: Sequence[torch.Tensor],
                 query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> None:
        self.layout = layout
        self.key_pools, self.value_pools = key_pools, value_pools
        self.slot_mappings, self.block_tables = slot_mappings, block_tables
        self.query_start_loc, self.seq_lens = query_start_loc, seq_lens

    def attend(self, kernels: Kernels, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, sinks: torch.Tensor, sliding_window: int | None,
               scale: float) -> torch.Tensor:
        group, slot = self.layout.layer_group[layer], self.layout.layer_slot[layer]
        key_pool, value_pool = self.key_pools[slot], self.value_pools[slot]
        slots = self.slot_mappings[group]
        key_pool.view(-1, *key_pool.shape[2:]).index_copy_(0, slots, k.to(key_pool.dtype))
        value_pool.view(-1, *value_pool.shape[2:]).index_copy_(0, slots, v.to(value_pool.dtype))
        return kernels.paged_attention(q, key_pool, value_pool, self.block_tables[group], self.query_start_loc,
                                       self.seq_lens, sinks, sliding_window, scale)
