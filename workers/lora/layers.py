"""The LoRA math of one step on one shard, plain torch: the adapters present, each with its token rows.

The Punica / S-LoRA idea without a custom kernel: the step's tokens are grouped by adapter (requests are contiguous
row segments, so each adapter owns a few segments), and every adapted module costs one shrink (x @ A^T, to rank r)
and one expand (@ B^T) per adapter present, added into the base output in place:

    qkv[rows, p] += (h[rows] @ qkv_a^T)[:, r_p] @ B_p^T  q, k, v in one shrink (their A rows stacked), one
                                                        expand each into its columns p of the fused output
    out[rows] += (attn[rows] @ o_a^T) @ o_b^T           before the all_reduce: under TP o_a holds this rank's
                                                        head columns, so the ranks' partials sum to B_o A_o x
    experts: for the tokens routed to local expert e, grouped by adapter,
    gate_up[rows] += (x[rows] @ A_e^T) @ B_e^T          before SwiGLU
    down[rows]    += (hidden[rows] @ A_e^T) @ B_e^T     before the routing weights

Every B already carries its module's scaling (workers.lora.adapter). Base rows are never touched, and a step
without adapters builds no LoraBatch at all (the model's base path runs unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss_cluster.workers.lora.adapter import AdapterWeights, LayerLora


def _add_low_rank(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  rows: torch.Tensor | None) -> None:
    """out[rows] += (x[rows] @ a^T) @ b^T in place (rows None: every row)."""
    if rows is None:
        out += (x @ a.t()) @ b.t()
    else:
        out.index_add_(0, rows, (x[rows] @ a.t()) @ b.t())


@dataclass
class AdapterRows:
    """One adapter of the step and the flat token rows [N] int64 (on the model's device) that use it; rows None =
    every row of the step (one adapter, no base rows: no gather, no scatter)."""

    weights: AdapterWeights
    rows: torch.Tensor | None


class ExpertHook:
    """`kernels.reference.ExpertLora` for one MoE layer: each token's adapter applied to the experts it was routed
    to. `layers`: per adapter of the step (LoraBatch.groups), its LayerLora here (None: no expert LoRA in this
    layer); `token_adapter` [T] int64: each row's index into them, -1 = base (None: layers[0] on every row)."""

    def __init__(self, layers: list[LayerLora | None], token_adapter: torch.Tensor | None) -> None:
        self.layers = layers
        self.token_adapter = token_adapter
        # add_gate_up and add_down of one expert get the same token_idx: its grouping is worked out once
        self._grouped: tuple[torch.Tensor, list[tuple[LayerLora, torch.Tensor | None]]] | None = None

    def _groups(self, token_idx: torch.Tensor) -> list[tuple[LayerLora, torch.Tensor | None]]:
        """(adapter's LayerLora, positions in token_idx using it) for each adapter present among these tokens."""
        if self.token_adapter is None:  # one adapter on every row
            return [(self.layers[0], None)]
        if self._grouped is not None and self._grouped[0] is token_idx:
            return self._grouped[1]
        which = self.token_adapter[token_idx]
        groups = []
        for index, layer in enumerate(self.layers):
            if layer is not None:
                rows = torch.nonzero(which == index).squeeze(1)
                if rows.numel():
                    groups.append((layer, rows))
        self._grouped = (token_idx, groups)
        return groups

    def add_gate_up(self, expert: int, token_idx: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        for layer, rows in self._groups(token_idx):
            if layer.gate_up_a is not None:
                _add_low_rank(out, x, layer.gate_up_a[expert], layer.gate_up_b[expert], rows)

    def add_down(self, expert: int, token_idx: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor) -> None:
        for layer, rows in self._groups(token_idx):
            if layer.down_a is not None:
                _add_low_rank(out, hidden, layer.down_a[expert], layer.down_b[expert], rows)


class LoraBatch:
    """The adapters of one step on one shard: which flat token rows use which adapter. Build it with
    `LoraBatch.from_slots` (a step: per-request slots) or `LoraBatch.single` (every row one adapter); the model
    calls `add_qkv`, `add_o` and passes `experts(layer)` to `moe_experts`."""

    def __init__(self, groups: list[AdapterRows], token_adapter: torch.Tensor | None) -> None:
        if not groups:
            raise ValueError("a LoraBatch needs at least one adapter (no adapter: pass lora=None)")
        self.groups = groups
        self.token_adapter = token_adapter  # [T] int64 index into groups, -1 = base; None: groups[0] on every row

    @classmethod
    def single(cls, weights: AdapterWeights) -> LoraBatch:
        """Every row of the forward uses `weights` (the offline one-sequence path)."""
        return cls([AdapterRows(weights, None)], None)

    @classmethod
    def from_slots(cls, adapters: list[AdapterWeights | None], request_slots: list[int],
                   query_start_loc: list[int], device: torch.device | str) -> LoraBatch | None:
        """`request_slots` [B] (host ints): each request's index into `adapters` (a pool's slots), -1 = base;
        `query_start_loc` [B + 1]: request b owns flat rows [qsl[b], qsl[b + 1]). None when no request uses one."""
        present = sorted({s for s in request_slots if s >= 0})
        if not present:
            return None
        index_of = {slot: i for i, slot in enumerate(present)}
        num_tokens = query_start_loc[-1]
        token_adapter = torch.full((num_tokens,), -1, dtype=torch.int64)
        rows: list[list[torch.Tensor]] = [[] for _ in present]
        for b, slot in enumerate(request_slots):
            start, stop = query_start_loc[b], query_start_loc[b + 1]
            if slot >= 0 and stop > start:
                token_adapter[start:stop] = index_of[slot]
                rows[index_of[slot]].append(torch.arange(start, stop))
        groups = []
        for slot, parts in zip(present, rows, strict=True):
            weights = adapters[slot]
            if weights is None:
                raise ValueError(f"LoRA slot {slot} holds no adapter")
            flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
            groups.append(AdapterRows(weights, flat.to(device)))
        if len(groups) == 1 and groups[0].rows.numel() == num_tokens:  # one adapter on every row
            return cls.single(groups[0].weights)
        return cls(groups, token_adapter.to(device))

    # ------------------------------------------------------------------------------------------------ the model's calls
    def _layers(self, layer: int):
        for group in self.groups:
            weights = group.weights.layers[layer]
            if weights is not None:
                yield weights, group.rows

    def add_qkv(self, layer: int, h: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """h [T, H] (normed input), qkv [T, (Hq + 2 Hkv)_local D] (fused projection output) += each adapter's q/k/v
        deltas on its rows, in place; returns qkv."""
        for weights, rows in self._layers(layer):
            if weights.qkv_a is None:
                continue
            shrunk = (h if rows is None else h[rows]) @ weights.qkv_a.t()  # [N, Rq + Rk + Rv]
            for column, rank0, b in weights.qkv_parts:
                delta = shrunk[:, rank0:rank0 + b.shape[1]] @ b.t()  # [N, out]
                target = qkv[:, column:column + b.shape[0]]  # a view: the adds land in qkv
                if rows is None:
                    target += delta
                else:
                    target.index_add_(0, rows, delta)
        return qkv

    def add_o(self, layer: int, attn: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """attn [T, Hq_local D], out [T, H] (this rank's partial o-projection, before the all_reduce) += each
        adapter's o delta from this rank's head columns, in place; returns out."""
        for weights, rows in self._layers(layer):
            if weights.o_a is not None:
                _add_low_rank(out, attn, weights.o_a, weights.o_b, rows)
        return out

    def experts(self, layer: int) -> ExpertHook | None:
        """The `moe_experts` hook of `layer`, or None when no adapter of the step adapts its experts."""
        layers = [g.weights.layers[layer] for g in self.groups]
        layers = [w if w is not None and w.has_experts else None for w in layers]
        if all(w is None for w in layers):
            return None
        return ExpertHook(layers, self.token_adapter)
