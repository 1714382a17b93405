"""ViLAMP's differential feature merging (DFM): every non-keyframe becomes one token, a softmax-weighted sum of its
patches that favours patches relevant to the query and unlike the anchor keyframe's patch at the same position.

Reference: steven-ccq/ViLAMP, `llava/model/multimodal_projector/builder.py` (`SigPooling`) and
`llava/model/llava_arch.py` (`LlavaLongVideoMetaForCausalLM.encode_images`, composer_type == "sig_pooling").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_TAU = 0.01  # SigPooling's initial temperature


class DFMProjection(nn.Module):
    """The checkpoint's learned DFM projections, with the reference's parameter names and shapes
    (`model.composer_projector.*`): patch projections for the query and keyframe terms, a projection of the query
    (from `query_dim`, the CLIP ViT-B/32 text space, 512, in the released model), one of the keyframe, a temperature."""

    def __init__(self, hidden_size: int, query_dim: int) -> None:
        super().__init__()
        self.linear_iq = nn.Linear(hidden_size, hidden_size)
        self.linear_ik = nn.Linear(hidden_size, hidden_size)
        self.linear_q = nn.Linear(query_dim, hidden_size)
        self.linear_k = nn.Linear(hidden_size, hidden_size)
        self.tau = nn.Parameter(torch.tensor(REFERENCE_TAU))

    @property
    def query_dim(self) -> int:
        return self.linear_q.in_features

    def accepts_query(self, query: torch.Tensor) -> bool:
        """Whether `query` lives in the space `linear_q` was trained on (only by its width; see `dfm_scores`)."""
        return query.shape[-1] == self.query_dim


@dataclass
class MergedFrames:
    """One DFM token per merged frame (F × D) and the normalised entropy of its patch weights (F,), in [0, 1]."""

    tokens: torch.Tensor
    entropy: torch.Tensor


def anchor_frames(keyframes: np.ndarray, num_frames: int, quirk: bool = True) -> torch.Tensor:
    """The frame each frame's patches are compared with (N,), given ascending keyframe indices.

    quirk=True is the reference's behaviour, kept because the released checkpoint was trained with it: frames before
    the first keyframe are compared with THEMSELVES, and frames in segment i (keyframe i up to keyframe i+1) with
    frame i of the video, not keyframe i (`key_frame_expanded` indexes `img_embs[idx]` by segment number).
    quirk=False compares leading frames with keyframe 0 and segment i with keyframe i.
    """
    frames = torch.arange(num_frames)
    if len(keyframes) == 0:
        return frames
    kf = torch.as_tensor(keyframes, dtype=torch.long)
    segment = torch.searchsorted(kf, frames, right=True) - 1
    before_first = segment < 0
    if quirk:
        return torch.where(before_first, frames, segment.clamp(min=0))
    return torch.where(before_first, kf[0], kf[segment.clamp(min=0)])


def dfm_scores(patches: torch.Tensor, anchors: torch.Tensor, query: torch.Tensor,
               module: DFMProjection | None) -> torch.Tensor:
    """(F, P) unscaled scores: cos(patch, query) − cos(patch, anchor patch at the same position), in float32.

    Parameter-free: cosines of the projected features themselves. Learned: the reference's SigPooling projections
    (linear_iq/linear_q for the query term, linear_ik/linear_k for the keyframe term); when `query` is not in
    linear_q's input space (the released model expects CLIP text embeddings, which this engine does not compute),
    the query term stays parameter-free and only the keyframe term is learned.
    """
    query = query.to(patches.device)
    if module is None:
        query_term = F.cosine_similarity(patches.float(), query.float()[None, None], dim=-1)
        return query_term - F.cosine_similarity(patches.float(), anchors.float(), dim=-1)
    weight_dtype = module.linear_iq.weight.dtype
    x, a = patches.to(weight_dtype), anchors.to(weight_dtype)
    if module.accepts_query(query):
        q = module.linear_q(query.to(weight_dtype))
        query_term = F.cosine_similarity(module.linear_iq(x).float(), q.float()[None, None], dim=-1)
    else:
        query_term = F.cosine_similarity(patches.float(), query.float()[None, None], dim=-1)
    key_term = F.cosine_similarity(module.linear_ik(x).float(), module.linear_k(a).float(), dim=-1)
    return query_term - key_term


def dfm_weights(patches: torch.Tensor, anchors: torch.Tensor, query: torch.Tensor, tau: float,
                module: DFMProjection | None = None) -> torch.Tensor:
    """(F, P) float32: softmax over each frame's patches of score/τ; a learned module uses its own τ (`tau` ignored).

    `patches`, `anchors`: (F, P, D) post-projector, pre-pooling features of the frames and of their anchor frames;
    `query`: (D_q,).
    """
    temperature = module.tau.float() if module is not None else torch.tensor(float(tau))
    return torch.softmax(dfm_scores(patches, anchors, query, module) / temperature.to(patches.device), dim=-1)


@torch.no_grad()
def merge_frames(patches: torch.Tensor, anchors: torch.Tensor, query: torch.Tensor, tau: float,
                 module: DFMProjection | None = None) -> MergedFrames:
    """DFM over F frames: the `dfm_weights`-weighted sum of each frame's patches, one token per frame."""
    weights = dfm_weights(patches, anchors, query, tau, module)
    tokens = torch.einsum("fp,fpd->fd", weights, patches.float()).to(patches.dtype)
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1) / math.log(max(patches.shape[1], 2))
    return MergedFrames(tokens=tokens, entropy=entropy)
