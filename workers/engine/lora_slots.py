"""Which LoRA adapters an engine serves, and which of them sit in the executor's `max_loras` pool slots.

Any number of adapters may be registered (`register`: the engine validated the files first); at most `max_loras`
are resident, LRU over the rest (vLLM's --max-loras). The scheduler asks for a request's slot when it admits the
request (`acquire`): its adapter's slot if resident, else a free slot or the least recently used slot no running
request pins. A request pins its slot while it runs and releases it when it finishes, is aborted or is preempted; a
request whose adapter cannot get a slot (every slot pinned by other adapters) simply waits. Nothing here touches the
executor: the engine takes the slots to load or drop (`take_work`) before it lays out the next step.

Removing an adapter (`unregister`) never fails the requests already using it, as in vLLM: new requests no longer find
the name, the queued and running ones finish with the weights they started with (a request holds its registration),
and the slot is freed once no running request pins it. A name removed and registered again is a new registration
(another `lora_id`, another prefix-cache salt), so no block or slot of the old weights serves the new ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptoss_cluster.workers.block_hash import lora_salt
from gptoss_cluster.workers.lora.adapter import AdapterInfo, LoraError, LoraNotFoundError, LoraSource


@dataclass(frozen=True)
class LoraRegistration:
    """One registration of an adapter under a name."""

    info: AdapterInfo
    lora_id: int  # 1, 2, ... in registration order: unique per registration, never reused

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def source(self) -> LoraSource:
        return LoraSource(self.info.name, self.info.path)

    @property
    def cache_salt(self) -> bytes:
        # The router salts by name alone (`lora_salt`); the engine adds the registration, so a name registered again
        # with other weights never reuses the blocks the old weights computed (29 bytes: still no base-model input).
        return lora_salt(self.name) + self.lora_id.to_bytes(8, "little")


@dataclass
class _Slot:
    lora: LoraRegistration | None = None  # assigned adapter (its weights may still be to load)
    loaded: bool = False  # the executor holds `lora`'s weights in this slot
    pins: int = 0  # running requests using it
    last_used: int = 0  # LRU clock


@dataclass
class LoraSlots:
    """The registry and the residency of the pool slots (bookkeeping only; the engine guards it with its lock)."""

    max_loras: int
    registry: dict[str, LoraRegistration] = field(default_factory=dict)
    slots: list[_Slot] = field(init=False)
    _slot_of: dict[int, int] = field(default_factory=dict)  # lora_id -> the slot assigned to it
    _unloads: set[int] = field(default_factory=set)  # slots whose weights the executor should drop
    _next_id: int = 1
    _clock: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_loras, bool) or not isinstance(self.max_loras, int) or self.max_loras <= 0:
            raise ValueError(f"max_loras must be a positive integer, got {self.max_loras!r}")
        self.slots = [_Slot() for _ in range(self.max_loras)]

    # ------------------------------------------------------------------------------------------------ registry
    def register(self, info: AdapterInfo) -> LoraRegistration:
        if info.name in self.registry:
            raise LoraError(f"a LoRA adapter named {info.name!r} is already registered")
        registration = LoraRegistration(info, self._next_id)
        self._next_id += 1
        self.registry[info.name] = registration
        return registration

    def unregister(self, name: str) -> LoraRegistration | None:
        """Forget `name` (None if unknown); its slot is freed now if unpinned, else when its last request ends."""
        registration = self.registry.pop(name, None)
        if registration is not None:
            at = self._slot_of.get(registration.lora_id)
            if at is not None and self.slots[at].pins == 0:
                self._free(at)
        return registration

    def lookup(self, name: str) -> LoraRegistration:
        registration = self.registry.get(name)
        if registration is None:
            known = ", ".join(sorted(self.registry)) or "none"
            raise LoraNotFoundError(f"no LoRA adapter named {name!r} (registered: {known})")
        return registration

    def infos(self) -> list[AdapterInfo]:
        return [r.info for r in self.registry.values()]

    # ------------------------------------------------------------------------------------------------ residency
    def acquire(self, lora: LoraRegistration) -> int | None:
        """Pin a slot for `lora` (assigning one if it has none) and return it; None: every slot is pinned by other
        adapters (the request waits)."""
        at = self._slot_of.get(lora.lora_id)
        if at is None:
            at = self._victim()
            if at is None:
                return None
            old = self.slots[at].lora
            if old is not None:
                del self._slot_of[old.lora_id]
            self._unloads.discard(at)  # loading into it replaces what it held
            self.slots[at] = _Slot(lora)
            self._slot_of[lora.lora_id] = at
        slot = self.slots[at]
        slot.pins += 1
        slot.last_used = self._tick()
        return at

    def release(self, at: int) -> None:
        """Unpin a slot `acquire` gave (its request finished, was aborted or was preempted)."""
        slot = self.slots[at]
        if slot.pins <= 0:
            raise RuntimeError(f"LoRA slot {at} released more often than acquired")
        slot.pins -= 1
        slot.last_used = self._tick()
        if slot.pins == 0 and slot.lora is not None and self.registry.get(slot.lora.name) is not slot.lora:
            self._free(at)  # unregistered while it ran

    def _victim(self) -> int | None:
        """A free slot, else the least recently used slot that no running request pins."""
        unpinned = [i for i, s in enumerate(self.slots) if s.pins == 0]
        if not unpinned:
            return None
        return min(unpinned, key=lambda i: (self.slots[i].lora is not None, self.slots[i].last_used))

    def _free(self, at: int) -> None:
        slot = self.slots[at]
        if slot.lora is not None:
            del self._slot_of[slot.lora.lora_id]
        if slot.loaded:
            self._unloads.add(at)
        self.slots[at] = _Slot(last_used=slot.last_used)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ------------------------------------------------------------------------------------------------ executor work
    def take_work(self) -> tuple[list[int], list[tuple[int, LoraSource]]]:
        """(slots to unload, (slot, adapter) to load) for the executor before the next step: the adapters of the
        pinned slots whose weights are not there yet. The caller reports each load with `loaded` or `failed`."""
        unloads, self._unloads = sorted(self._unloads), set()
        loads = [(i, s.lora.source) for i, s in enumerate(self.slots) if s.lora is not None and s.pins and not s.loaded]
        return unloads, loads

    def has_work(self) -> bool:
        return bool(self._unloads) or any(s.lora is not None and s.pins and not s.loaded for s in self.slots)

    def loaded(self, at: int) -> None:
        self.slots[at].loaded = True

    def failed(self, at: int) -> None:
        """A load failed: the slot keeps its adapter unloaded (its requests are ended; a later one tries again)."""
        self.slots[at].loaded = False

    def pinned_by(self, at: int) -> int:
        return self.slots[at].pins

    @property
    def num_resident(self) -> int:
        """Adapters whose weights the executor holds (a freed slot's until `take_work` hands out its unload)."""
        return sum(s.loaded for s in self.slots) + len(self._unloads)

    def resident(self) -> list[str | None]:
        """The adapter name loaded in each slot (None: empty), for tests and stats."""
        return [s.lora.name if s.loaded and s.lora is not None else None for s in self.slots]
