"""The engine's attention function, registered with transformers under the name "frame_arena".

It runs SDPA (flash-attn 2 when importable on CUDA) with the visibility the prefill plan asks for, and, when a
probe is attached, scores only the probed (question) rows — one head at a time, reduced at once to one number
per key — so attention over frames never needs eager attention or heads × q × kv memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

from engine.kv_cache import ArenaCache

ATTENTION_NAME = "frame_arena"

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


class AttentionProbe:
    """Per-layer attention of the probed rows over original sequence positions: mean over rows and heads, and the
    last row alone (what PyramidDrop ranks by). Memory is O(layers × positions)."""

    def __init__(self, num_layers: int, total_positions: int, rows_from: int) -> None:
        self.total = total_positions
        self.rows_from = rows_from
        self.mean_rows: list[torch.Tensor | None] = [None] * num_layers
        self.last_row: list[torch.Tensor | None] = [None] * num_layers

    def observe(self, layer: int, query: torch.Tensor, query_pos: torch.Tensor, key: torch.Tensor,
                key_pos: torch.Tensor, scaling: float) -> None:
        rows = (query_pos >= self.rows_from).nonzero().flatten()
        if rows.numel() == 0:
            return
        q = query[0, :, rows].float()
        k = key[0].float()
        group = q.shape[0] // k.shape[0]
        visible = key_pos[None, :] <= query_pos[rows][:, None]
        mean_acc = torch.zeros(k.shape[1], device=k.device)
        last_acc = torch.zeros(k.shape[1], device=k.device)
        for head in range(q.shape[0]):
            scores = (q[head] @ k[head // group].T) * scaling
            weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            mean_acc += weights.mean(dim=0)
            last_acc += weights[-1]
        heads = q.shape[0]
        self.mean_rows[layer] = self._scatter(mean_acc / heads, key_pos)
        self.last_row[layer] = self._scatter(last_acc / heads, key_pos)

    def _scatter(self, per_key: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.total, device=per_key.device)
        return out.index_add_(0, key_pos, per_key)


@dataclass
class AttnSpec:
    """Passed through the decoder layers as `attention_mask`: who the current chunk's rows may see.

    `key_index` (into the layer's cache entries) restricts every row to those keys, except `full_rows`, which see
    every earlier entry (Video-XL-2's timestamp tokens). Rows always see only keys at positions ≤ their own.
    """

    cache: ArenaCache
    query_pos: torch.Tensor
    key_index: torch.Tensor | None = None
    full_rows: torch.Tensor | None = None
    probe: AttentionProbe | None = None


def _use_flash(query: torch.Tensor) -> bool:
    """flash-attn 2 on CUDA in half precision, unless FRAME_ARENA_ATTENTION=sdpa asks for SDPA only."""
    if os.environ.get("FRAME_ARENA_ATTENTION", "auto") == "sdpa":
        return False
    return flash_attn_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_pos: torch.Tensor,
                     key_pos: torch.Tensor, scaling: float, tail_aligned: bool) -> torch.Tensor:
    """Attention where a row sees keys at positions ≤ its own. (B, H, q, d) → (B, H, q, d).

    `tail_aligned`: the query rows are the last q keys (the usual case: they were just appended to the cache),
    so causality is a bottom-right triangle and no position comparison is needed.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    group = query.shape[1] // key.shape[1]
    if tail_aligned and _use_flash(query):
        out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              softmax_scale=scaling, causal=True)
        return out.transpose(1, 2)
    if tail_aligned and (q_len == 1 or q_len == kv_len):
        # No mask needed: SDPA handles grouped KV heads itself (and keeps the flash kernel on CUDA).
        return F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1, scale=scaling,
                                              enable_gqa=group > 1)
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    if tail_aligned and query.is_cuda:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(q_len, kv_len),
                                              scale=scaling)
    mask = key_pos[None, :] <= query_pos[:, None]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def arena_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: AttnSpec, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: returns (B, q, H, d) and no weights."""
    spec = attention_mask
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    key_pos = spec.cache.positions(layer).to(query.device)
    query_pos = spec.query_pos.to(query.device)
    if spec.key_index is None:
        out = causal_attention(query, key, value, query_pos, key_pos, scaling, tail_aligned=True)
    else:
        index = spec.key_index.to(query.device)
        out = causal_attention(query, key[:, :, index], value[:, :, index], query_pos, key_pos[index], scaling,
                               tail_aligned=True)
        if spec.full_rows is not None and spec.full_rows.numel():
            rows = spec.full_rows.to(query.device)
            out[:, :, rows] = causal_attention(query[:, :, rows], key, value, query_pos[rows], key_pos, scaling,
                                               tail_aligned=False)
    if spec.probe is not None:
        spec.probe.observe(layer, query, query_pos, key, key_pos, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, arena_attention)


def enable_arena_attention(model: nn.Module) -> None:
    """Route the language model's attention through `arena_attention` (the vision tower keeps its own)."""
    model.config.text_config._attn_implementation = ATTENTION_NAME
    language_model = model.model.language_model
    language_model.config._attn_implementation = ATTENTION_NAME
