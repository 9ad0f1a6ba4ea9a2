"""The name of a full KV block: a hash chain over its tokens and every token before it.

The engine's prefix cache (`workers.engine.kv_cache`) keys blocks by it, and the router hashes prompts the same way
to send a request where its prefix is cached, so "same hash" means "that replica's cache can hold it". It lives
apart from the KV cache so that the router's process needs neither torch nor the kernels to compute it.

A LoRA adapter changes every key and value, so its blocks are another chain: `salt` (`lora_salt(name)`) stands in
for the empty parent of the first block. The base model's salt is b"", which leaves its hashes as they always were.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

__all__ = ["hash_block", "lora_salt", "prefix_hashes"]


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The chained name of a full block: a hash of its predecessor's name and its own token ids."""
    return hashlib.blake2b(parent + np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def lora_salt(name: str | None) -> bytes:
    """The first parent of an adapter's hash chains: b"" for the base model, else derived from the adapter's name.

    21 bytes: chains of the base model hash inputs of 8k or 16 + 8k bytes, a salted first block 21 + 8k, so no
    salted block can name the same input as a block of the base model."""
    if name is None:
        return b""
    return b"lora:" + hashlib.blake2b(name.encode(), digest_size=16).digest()


def prefix_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int, salt: bytes = b"") -> list[bytes]:
    """The hash chain of the leading full blocks of `token_ids` (at most `max_blocks`), as the engine computes it;
    `salt`: `lora_salt` of the request's adapter."""
    out: list[bytes] = []
    parent = salt
    for i in range(min(len(token_ids) // block_size, max_blocks)):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out
