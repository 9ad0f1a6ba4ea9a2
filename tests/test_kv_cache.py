"""The KV block manager: pool, block tables, sliding-window release, prefix hash chain, LRU eviction, refcounts."""

import pytest
import torch

from gptoss_cluster.workers.config import ModelConfig
from gptoss_cluster.workers.engine.config import EngineConfig
from gptoss_cluster.workers.engine.kv_cache import BlockPool, KVCacheLayout, KVCacheManager, hash_block, kv_pool_blocks
from gptoss_cluster.workers.engine.request import Request
from gptoss_cluster.workers.sampling import SamplingParams

CFG = ModelConfig.preset("tiny")  # 4 layers: sliding, full, sliding, full; window 128
BS = 16


def make(tokens, request_id="r"):
    return Request(request_id, list(tokens), SamplingParams(max_tokens=8))


def compute(kv, request, n, hit=None):
    """What a step does to the manager: allocate, 'run', mark computed, offer full blocks to the cache."""
    assert kv.allocate_slots(request, n, hit)
    request.num_computed_tokens += n + (hit.num_tokens if hit else 0)
    kv.register_computed(request)


def tokens(n, seed):
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_layout_groups_layers_by_window():
    layout = KVCacheLayout.from_model_config(CFG, BS)
    assert [g.sliding_window for g in layout.groups] == [128, None]
    assert [g.layers for g in layout.groups] == [(0, 2), (1, 3)]
    assert layout.layer_group == (0, 1, 0, 1) and layout.layer_slot == (0, 0, 1, 1)
    assert layout.num_slots == 2
    assert layout.block_bytes(4, 32, torch.float32) == 2 * 2 * BS * 4 * 32 * 4
    full_only = KVCacheLayout.from_model_config(CFG.replace(layer_types=("full_attention",) * 4), BS)
    assert len(full_only.groups) == 1 and full_only.num_slots == 4
    # a request of 1000 tokens holds at most 63 full blocks + the window's blocks on the sliding group
    assert layout.blocks_needed(1000, 16) == 63 + (16 + 127) // 16 + 2


def test_pool_size_on_cpu_is_what_the_engine_can_use_and_on_cuda_a_share_of_the_device():
    layout = KVCacheLayout.from_model_config(CFG, BS)
    block = layout.block_bytes(4, 32, torch.bfloat16)  # 16 KiB

    def size(max_model_len=4096, device="cpu", free=lambda: 1 << 40, **config):
        return kv_pool_blocks(EngineConfig(**config), layout, max_model_len, block, device, free)

    # by need: 8 sequences of 4096 tokens; the sliding group holds its window and one step's tokens, not 4096
    per_sequence = 4096 // BS + (2048 + 127) // BS + 2
    assert size(max_num_seqs=8) == 8 * per_sequence
    # by the CPU budget: 64 sequences of the model's whole context would take 8 GiB; the default 4 GiB caps them
    assert size(max_model_len=131072) == 4 * 2**30 // block
    assert size(max_model_len=131072, cpu_kv_space_gib=0.5) == 2**29 // block
    # by free memory: kv_memory_fraction of it
    assert size(max_num_seqs=8, free=lambda: 100 * block) == 50
    assert size(max_num_seqs=8, free=lambda: 100 * block, kv_memory_fraction=0.2) == 20
    # an explicit num_blocks wins, and then free memory is never read (on Ray that is a round of remote calls)
    assert size(num_blocks=7, max_model_len=131072, free=lambda: pytest.fail("free memory read")) == 7
    # on CUDA the pool takes the fraction of free device memory, whatever the need and the CPU budget
    gpu = 80 * 2**30
    assert size(device="cuda", max_num_seqs=1, free=lambda: gpu, kv_memory_fraction=0.9) == int(0.9 * gpu) // block
    with pytest.raises(ValueError, match="holds no KV block"):
        size(free=lambda: block)
    with pytest.raises(ValueError, match="cpu_kv_space_gib .* holds no KV block"):
        size(cpu_kv_space_gib=1e-9)
    for bad in (0, -1.0, True, float("inf"), float("nan"), "4"):
        with pytest.raises(ValueError, match="cpu_kv_space_gib"):
            EngineConfig(cpu_kv_space_gib=bad)


def test_allocate_and_free_restore_the_pool():
    kv = KVCacheManager(KVCacheLayout.from_model_config(CFG, BS), 64)
    a, b = make(tokens(40, 0), "a"), make(tokens(17, 1), "b")
    compute(kv, a, 40)
    compute(kv, b, 17)
    assert kv.num_free_blocks == 64 - 2 * 3 - 2 * 2
    assert kv.block_ids(a, 0) != kv.block_ids(a, 1)  # each group has its own blocks
    kv.check()
    kv.free(a)
    kv.free(b)
    kv.check()
    assert kv.num_free_blocks == 64 and kv.usage == 0.0


def test_sliding_group_returns_blocks_out_of_the_window():
    kv = KVCacheManager(KVCacheLayout.from_model_config(CFG, BS), 200)
    req = make(tokens(400, 2))
    compute(kv, req, 300)
    compute(kv, req, 1)  # the next step releases what position 300's query cannot see: positions < 173
    sliding = kv._tables[req].blocks[0]
    first_needed = (300 - 128 + 1) // BS
    assert all(b is None for b in sliding[:first_needed]) and all(b is not None for b in sliding[first_needed:])
    assert all(b is not None for b in kv._tables[req].blocks[1])  # full attention keeps everything
    held = 200 - kv.num_free_blocks
    assert held == 19 + (19 - first_needed)
    for _ in range(99):
        compute(kv, req, 1)
    assert 200 - kv.num_free_blocks <= 25 + (127 + 1) // BS + 2  # sliding stays bounded while full grows
    kv.check()
    kv.free(req)
    assert kv.num_free_blocks == 200
    kv.check()


def test_hash_chain_names_a_block_by_its_whole_prefix():
    a, b = [1] * BS, [2] * BS
    assert hash_block(b"", a) != hash_block(b"", b)
    assert hash_block(hash_block(b"", a), b) != hash_block(hash_block(b"", b), b)
    assert hash_block(b"", a) == hash_block(b"", list(a))


def test_prefix_hit_shares_blocks_and_leaves_a_token_to_compute():
    kv = KVCacheManager(KVCacheLayout.from_model_config(CFG, BS), 64)
    base = tokens(100, 3)
    a = make(base, "a")
    compute(kv, a, 100)
    b = make(base[:70] + tokens(10, 4), "b")
    hit = kv.find_prefix(b)
    assert hit.num_tokens == 64
    compute(kv, b, b.num_tokens - 64, hit)
    for g in range(2):
        assert kv.block_ids(b, g)[:4] == kv.block_ids(a, g)[:4]
        assert kv.block_ids(b, g)[4] != kv.block_ids(a, g)[4]
        assert all(kv._tables[b].blocks[g][j].ref_cnt == 2 for j in range(4))
    kv.check()
    # exactly four cached blocks of prompt: one token is left to compute, so three are reused
    c = make(base[:64], "c")
    assert kv.find_prefix(c).num_tokens == 48
    kv.free(a)
    kv.free(b)
    kv.check()
    assert kv.num_free_blocks == 64
    # freed blocks keep their content: a later request still hits
    d = make(base[:90], "d")
    assert kv.find_prefix(d).num_tokens == 80


def test_prefix_hit_with_sliding_window_needs_only_the_window():
    kv = KVCacheManager(KVCacheLayout.from_model_config(CFG, BS), 200)
    base = tokens(320, 5)
    a = make(base, "a")
    for chunk in (100, 100, 120):  # chunks not aligned to blocks or to the window
        compute(kv, a, chunk)
    compute(kv, a, 0)  # release out-of-window sliding blocks
    assert kv._tables[a].blocks[0][0] is None  # the sliding layer gave block 0 back ...
    kv.free(a)
    b = make(base[:250] + [7, 7, 7], "b")
    hit = kv.find_prefix(b)
    assert hit.num_tokens == 240
    lo = (240 - 128 + 1) // BS
    assert hit.blocks[0][:lo] == [None] * lo and all(x is not None for x in hit.blocks[0][lo:])
    assert all(x is not None for x in hit.blocks[1])
    compute(kv, b, b.num_tokens - 240, hit)
    kv.check()
    kv.free(b)
    # Evict one sliding block inside that window: the hit falls back to a prefix whose window is whole.
    victim = kv.pool.lookup(0, kv.block_hashes(b)[12])
    kv.pool.free.move_to_end(victim.block_id, last=False)
    taken = kv.pool.allocate(1)
    assert taken == [victim] and victim.key is None
    c = make(base[:250], "c")
    hit = kv.find_prefix(c)
    # prefix m (blocks) is usable iff sliding blocks [(16m - 127) // 16, m) are cached: block 12 is gone
    assert hit.num_tokens == 12 * BS
    kv.pool.release(taken)
    kv.check()


def test_lru_eviction_and_counters():
    kv = KVCacheManager(KVCacheLayout.from_model_config(CFG, BS), 16)
    first = make(tokens(64, 6), "first")
    compute(kv, first, 64)
    kv.free(first)
    assert kv.num_free_blocks == 16 and len(kv.pool.cached) == 8
    other = make(tokens(64, 7), "other")
    compute(kv, other, 64)  # 8 fresh blocks: the pool evicts first's blocks, last ones first
    kv.free(other)
    assert kv.pool.num_evictions == 0  # 8 uncached blocks were free first
    third = make(tokens(80, 8), "third")
    compute(kv, third, 80)  # 10 blocks: evicts 10 cached ones, LRU (first's, tail first)
    assert kv.pool.num_evictions == 10
    again = make(tokens(64, 6), "again")
    assert kv.find_prefix(again) is None  # first's tail blocks went first: its chain is broken
    kv.record_prefix_query(64, 0)
    kv.record_prefix_query(100, 48)
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (164, 48)
    assert (kv.prefix_query_requests, kv.prefix_hit_requests) == (2, 1)
    kv.check()


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(KVCacheLayout.from_model_config(CFG, BS), 6)
    a = make(tokens(50, 9), "a")
    compute(kv, a, 40)
    free = kv.num_free_blocks
    assert not kv.allocate_slots(a, 100)
    assert kv.num_free_blocks == free
    kv.check()


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(KVCacheLayout.from_model_config(CFG, BS), 32, enable_prefix_caching=False)
    a = make(tokens(64, 10), "a")
    compute(kv, a, 64)
    assert not kv.pool.cached and kv.find_prefix(make(tokens(64, 10), "b")) is None


def test_pool_refcounts():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.touch(blocks)
    pool.release(blocks)
    assert pool.num_free == 2
    pool.release(blocks)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(blocks[:1])
    with pytest.raises(RuntimeError, match="asked for 5"):
        pool.allocate(5)


def test_a_hit_block_of_one_group_is_never_the_fresh_block_of_another():
    """With the pool nearly exhausted, the fresh block the first group allocates comes off the front of the free
    queue, where the second group's (unreferenced) cached hit block sits: every hit block is taken before any fresh
    block is allocated, so it stays cached and is not handed out again (the bug: it was evicted into group 0's table
    while group 1 kept it as its cached prefix, and the new tokens overwrote that prefix's keys/values)."""
    kv = KVCacheManager(KVCacheLayout.from_model_config(CFG, BS), 6)
    a, c = make(tokens(32, 20), "a"), make(tokens(1, 21), "c")
    compute(kv, a, 32)  # 2 cached blocks per group
    kv.free(a)
    compute(kv, c, 1)  # the 2 never-used blocks; freed after a's, so they queue behind a's cached blocks
    kv.free(c)
    b = make(a.token_ids + [7], "b")
    hit = kv.find_prefix(b)
    assert hit is not None and hit.num_tokens == 32
    hit_ids = [[blk.block_id for blk in blocks] for blocks in hit.blocks]
    compute(kv, b, 1, hit)
    kv.check()
    assert kv.num_free_blocks == 0
    for g in range(2):
        assert kv.block_ids(b, g)[:2] == hit_ids[g]
        for j, block_hash in enumerate(b.block_hashes[:2]):
            assert kv.pool.lookup(g, block_hash).block_id == hit_ids[g][j]  # still cached, never evicted
    assert not set(kv.block_ids(b, 0)) & set(kv.block_ids(b, 1))  # no block id in two groups' tables
