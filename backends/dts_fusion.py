"""Video-XL-2's DTS fusion: 4 frames' 24×24 SigLIP maps → one map, learned (the released autoencoder) or parameter-free.

The learned module's attribute names follow the public checkpoint (`model.sae.*` there), so its state dict loads
with strict=True. Reference: VectorSpaceLab/Video-XL, Video-XL-2 `model/sae.py`, `sae_utils.py`,
`attention_temporal_videoae.py` (read, not copied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 4
MAX_DISTANCE = 64
PARAMETER_FREE_TEMPERATURE = 0.1


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class RelativePositionTable(nn.Module):
    """A learned vector per clipped relative distance (key − query), |distance| ≤ `max_distance`."""

    def __init__(self, dim: int, max_distance: int = MAX_DISTANCE) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.embeddings_table = nn.Parameter(torch.empty(2 * max_distance + 1, dim))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, length_q: int, length_k: int) -> torch.Tensor:
        """(length_q, length_k, dim): entry [i, j] is the table row for distance j − i."""
        device = self.embeddings_table.device
        distance = torch.arange(length_k, device=device)[None, :] - torch.arange(length_q, device=device)[:, None]
        return self.embeddings_table[distance.clamp(-self.max_distance, self.max_distance) + self.max_distance]


def relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table_k: torch.Tensor,
                       table_v: torch.Tensor) -> torch.Tensor:
    """Single-head attention over time with relative-position terms; q, k, v (N, C, T) → (N, C, T).

    Quirk kept (the released weights were trained with it): the relative key term of row i, column j uses the
    query at the KEY position j and the table entry for the reversed distance i − j, i.e. q_j · table_k[j, i],
    scaled once by C^-1/4 where q·k is scaled by C^-1/2. The value term is the usual Σ_j w_ij table_v[i, j].
    """
    scale = q.shape[1] ** -0.25
    weight = torch.einsum("nct,ncs->nts", q * scale, k * scale)
    weight = weight + torch.einsum("ncs,sic->nis", q * scale, table_k)
    weight = weight.float().softmax(dim=-1).to(weight.dtype)
    out = torch.einsum("nts,ncs->nct", weight, v)
    return out + torch.einsum("nts,tsc->nct", weight, table_v)


class FrameAttention(nn.Module):
    """Self-attention over the H×W positions of each time step (1×1×1 conv projections, one head)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv3d(channels, channels, kernel_size=1)
        self.k = nn.Conv3d(channels, channels, kernel_size=1)
        self.v = nn.Conv3d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv3d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        normed = self.norm(x)

        def per_step(y: torch.Tensor) -> torch.Tensor:
            return y.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)

        q, k, v = per_step(self.q(normed)), per_step(self.k(normed)), per_step(self.v(normed))
        weights = (q @ k.transpose(1, 2) * c**-0.5).softmax(dim=-1)
        out = (weights @ v).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return x + self.proj_out(out)


class TemporalAttention(nn.Module):
    """Single-head attention along time at every spatial position, with relative-position tables (max 64)."""

    def __init__(self, channels: int, max_distance: int = MAX_DISTANCE) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, kernel_size=1)
        self.relative_position_k = RelativePositionTable(channels, max_distance)
        self.relative_position_v = RelativePositionTable(channels, max_distance)
        self.proj_out = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        seq = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)
        q, k, v = self.qkv(self.norm(seq)).chunk(3, dim=1)
        out = relative_attention(q, k, v, self.relative_position_k(t, t), self.relative_position_v(t, t))
        out = self.proj_out(out).reshape(b, h, w, c, t).permute(0, 3, 4, 1, 2)
        return x + out


class TimeStridedConv(nn.Module):
    """3D conv, kernel 3, stride 2 in time; replicate padding time 1 front / 0 back, space 1 / 1 (applied in fp32)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, stride=(2, 1, 1), padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x.float(), (1, 1, 1, 1, 1, 0), mode="replicate").to(x.dtype)
        return self.conv(padded)


class DTSAutoencoder(nn.Module):
    """The learned DTS fusion: (G, C, 4, H, W) → (G, C, 1, H, W); temporal encoding, then twice
    (frame attention → temporal attention → time-strided conv)."""

    def __init__(self, channels: int = 1152) -> None:
        super().__init__()
        self.temporal_encoding = nn.Parameter(torch.randn(GROUP, channels))
        self.encoder = nn.Sequential(
            FrameAttention(channels), TemporalAttention(channels), TimeStridedConv(channels),
            FrameAttention(channels), TemporalAttention(channels), TimeStridedConv(channels),
        )

    @property
    def channels(self) -> int:
        return int(self.temporal_encoding.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x + self.temporal_encoding.T[None, :, :, None, None].to(x.dtype))


def reference_time_axis(maps: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """The autoencoder's input layout: contiguous (group·G, C, H, W) VIEWED as (G, C, group, H, W).

    Quirk kept (the released weights only work with it): a raw reshape, not a permute, so the "time" axis runs over
    `group` consecutive channels of one frame and frame f of a group fills channels f·C/group … (f+1)·C/group − 1.
    """
    frames, channels, h, w = maps.shape
    return maps.contiguous().view(frames // group, channels, group, h, w)


def learned_fusion(module: DTSAutoencoder, maps: torch.Tensor) -> torch.Tensor:
    """(4G, C, H, W) padded frame maps → (G, H·W, C) fused maps, row-major."""
    fused = module(reference_time_axis(maps.to(module.temporal_encoding.dtype))).squeeze(2)
    return fused.permute(0, 2, 3, 1).flatten(1, 2)


def parameter_free_fusion(maps: torch.Tensor, group: int = GROUP,
                          temperature: float = PARAMETER_FREE_TEMPERATURE) -> torch.Tensor:
    """(group·G, C, H, W) → (G, H·W, C): at each position a softmax-weighted mean of the group's frames.

    Weights are softmax over frames of (1 − cosine(frame, group mean)) / temperature: where the frames agree
    the result is their plain mean, where one frame departs from the rest (motion, a cut) it dominates.
    """
    frames, channels, h, w = maps.shape
    x = maps.float().view(frames // group, group, channels, h * w).transpose(2, 3)
    mean = x.mean(dim=1, keepdim=True)
    novelty = 1.0 - F.cosine_similarity(x, mean.expand_as(x), dim=-1, eps=1e-6)
    weights = (novelty / temperature).softmax(dim=1)
    return (weights[..., None] * x).sum(dim=1).to(maps.dtype)
