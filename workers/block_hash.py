"""The name of a full KV block: a hash chain over its tokens and every token before it.

The engine's prefix cache (`workers.engine.kv_cache`) keys blocks by it, and the router hashes prompts the same way
to send a request where its prefix is cached, so "same hash" means "that replica's cache can hold it". It lives
apart from the KV cache so that the router's process needs neither torch nor the kernels to compute it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

__all__ = ["hash_block", "prefix_hashes"]


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The chained name of a full block: a hash of its predecessor's name and its own token ids."""
    return hashlib.blake2b(parent + np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def prefix_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int) -> list[bytes]:
    """The hash chain of the leading full blocks of `token_ids` (at most `max_blocks`), as the engine computes it."""
    out: list[bytes] = []
    parent = b""
    for i in range(min(len(token_ids) // block_size, max_blocks)):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out
