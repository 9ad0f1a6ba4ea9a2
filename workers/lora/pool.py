"""The adapters resident on one shard: `max_loras` slots, filled and emptied by the engine (through the executor's
add_lora / remove_lora); which adapter lives in which slot, and when one is evicted, is the engine's decision."""

from __future__ import annotations

import torch

from gptoss_cluster.workers.lora.adapter import AdapterWeights, LoraError
from gptoss_cluster.workers.lora.layers import LoraBatch


class LoraPool:
    def __init__(self, max_loras: int) -> None:
        if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 0:
            raise ValueError(f"max_loras must be a non-negative integer, got {max_loras!r}")
        self.max_loras = max_loras
        self.slots: list[AdapterWeights | None] = [None] * max_loras

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_loras:
            raise LoraError(f"LoRA slot {slot!r} is outside [0, {self.max_loras}) (max_loras={self.max_loras})")

    def load(self, slot: int, weights: AdapterWeights) -> None:
        """Put `weights` in `slot`, replacing whatever was there."""
        self._check_slot(slot)
        self.slots[slot] = weights

    def unload(self, slot: int) -> None:
        self._check_slot(slot)
        self.slots[slot] = None

    def batch(self, lora_slots: torch.Tensor | None, query_start_loc: torch.Tensor,
              device: torch.device | str) -> LoraBatch | None:
        """The step's LoraBatch from host tensors: `lora_slots` [B] (each request's slot, -1 = base; None = no
        adapter in the step) and `query_start_loc` [B + 1]. None when no request uses an adapter."""
        if lora_slots is None:
            return None
        slots = lora_slots.tolist()
        qsl = query_start_loc.tolist()
        if len(qsl) != len(slots) + 1:
            raise ValueError(f"lora_slots has {len(slots)} entries for {len(qsl) - 1} requests")
        for slot in slots:
            if slot >= 0:
                self._check_slot(slot)
                if self.slots[slot] is None:
                    raise LoraError(f"LoRA slot {slot} holds no adapter (add_lora must load it before a step uses it)")
            elif slot != -1:
                raise LoraError(f"LoRA slot {slot} is not a slot (-1 = the base model)")
        return LoraBatch.from_slots(self.slots, slots, qsl, device)

    def resident_bytes(self) -> int:
        return sum(w.num_bytes for w in self.slots if w is not None)

    def resident(self) -> dict[int, str]:
        """slot -> adapter name of the filled slots."""
        return {slot: w.name for slot, w in enumerate(self.slots) if w is not None}
