"""A per-layer KV cache with in-place writes, per-layer lengths and the original position of every entry.

Layers may hold different token sets (token dropping, pooled KV), so each layer keeps its own `positions`.
Only `update(k, v, layer_idx)` is what transformers' attention modules call.
"""

from __future__ import annotations

import torch


class ArenaCache:
    def __init__(self, num_layers: int, reserve: int = 0) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.pos: list[torch.Tensor | None] = [None] * num_layers
        self.span: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.reserve = reserve
        self.write_positions: torch.Tensor | None = None
        # How far each layer's RoPE positions run behind the original ones (token dropping compacts them).
        self.rope_shift = [0] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def _ensure_capacity(self, layer: int, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        current = self.keys[layer]
        if current is not None and current.shape[2] >= needed:
            return
        capacity = max(needed, self.reserve, 2 * (current.shape[2] if current is not None else 0))
        batch, heads, _, dim = k.shape
        new_k = k.new_empty(batch, heads, capacity, dim)
        new_v = v.new_empty(batch, heads, capacity, v.shape[-1])
        new_pos = torch.empty(capacity, dtype=torch.long, device=k.device)
        new_span = torch.ones(capacity, dtype=torch.long, device=k.device)
        n = self.lengths[layer]
        if current is not None and n:
            new_k[:, :, :n] = current[:, :, :n]
            new_v[:, :, :n] = self.values[layer][:, :, :n]
            new_pos[:n] = self.pos[layer][:n]
            new_span[:n] = self.span[layer][:n]
        self.keys[layer], self.values[layer], self.pos[layer], self.span[layer] = new_k, new_v, new_pos, new_span

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append this step's K/V (positions from `write_positions`) and return the layer's whole K/V as views."""
        n, q = self.lengths[layer_idx], key.shape[2]
        self._ensure_capacity(layer_idx, key, value, n + q)
        self.keys[layer_idx][:, :, n : n + q] = key
        self.values[layer_idx][:, :, n : n + q] = value
        self.pos[layer_idx][n : n + q] = self.write_positions.to(key.device)
        self.span[layer_idx][n : n + q] = 1
        self.lengths[layer_idx] = n + q
        return self.keys[layer_idx][:, :, : n + q], self.values[layer_idx][:, :, : n + q]

    def positions(self, layer: int) -> torch.Tensor:
        return self.pos[layer][: self.lengths[layer]]

    def spans(self, layer: int) -> torch.Tensor:
        """How many original tokens each entry stands for (1, or the pooling factor for pooled KV)."""
        return self.span[layer][: self.lengths[layer]]

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.lengths[layer]
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]

    def truncate(self, length_by_layer: list[int]) -> None:
        """Forget entries past each layer's given length (e.g. a question pass that must be re-run)."""
        self.lengths = [min(cur, keep) for cur, keep in zip(self.lengths, length_by_layer)]

    def replace_layer(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, spans: torch.Tensor
    ) -> None:
        """Swap a layer's entries for a rebuilt set (pooled or pruned), keeping headroom for later writes."""
        n = keys.shape[2]
        self.keys[layer], self.values[layer], self.pos[layer], self.span[layer] = None, None, None, None
        self.lengths[layer] = 0
        self._ensure_capacity(layer, keys, values, n + 64)
        self.keys[layer][:, :, :n] = keys
        self.values[layer][:, :, :n] = values
        self.pos[layer][:n] = positions
        self.span[layer][:n] = spans
        self.lengths[layer] = n

    def nbytes(self) -> int:
        total = 0
        for layer in range(self.num_layers):
            n = self.lengths[layer]
            if self.keys[layer] is not None and n:
                total += self.keys[layer][:, :, :n].nbytes + self.values[layer][:, :, :n].nbytes
        return total
