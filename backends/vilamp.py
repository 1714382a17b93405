"""`vilamp`: ViLAMP — K query-relevant, mutually different keyframes keep full tokens (DKS); every other frame becomes
ONE token by differential feature merging (DFM); the sequence runs in time order with one newline at the end.

Reference: steven-ccq/ViLAMP, `llava/model/llava_arch.py` (`LlavaLongVideoMetaForCausalLM.encode_images`, the
interleaving of composed frame embeddings with keyframe features in `prepare_inputs_labels_for_multimodal`),
`llava/model/multimodal_resampler/frame_selector.py` (DKS) and `llava/model/multimodal_projector/builder.py`
(`SigPooling`, DFM). Selection and merging live in `backends/vilamp_dks.py` and `backends/vilamp_dfm.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from backends.base import Backend, ModelOps, Param
from backends.registry import register_backend
from backends.uniform import bilinear_pool_2x
from backends.vilamp_dfm import REFERENCE_TAU, DFMProjection, MergedFrames, anchor_frames, merge_frames
from backends.vilamp_dks import SummarySimilarity, select_keyframes
from engine.errors import ModelUnavailable, UserFacingError
from engine.types import DensePlan, FrameFeatures, VisualTokens

EXTRA_MODULE = "dfm"
CHUNK_FRAMES = 16  # frames projected at once: bounds the (chunk × P × D_llm) activations for 10,000-frame videos
RELEVANCE_NOTE = ("keyframe relevance (f2t) and similarity (f2f) come from the loaded model — question attention "
                  "over per-frame mean tokens, divided by its maximum — not from ViLAMP's CLIP ViT-B/32 selector")
DFMChoice = Literal["auto", "learned", "parameter-free"]


@dataclass(frozen=True)
class ViLAMPParams:
    k: int = field(default=32, metadata={"param": Param(
        label="Keyframes K", minimum=1, maximum=256, step=1,
        help="Frames that keep all their tokens (the authors: 32). Every other frame becomes one token.")})
    f2t_threshold: float = field(default=0.2, metadata={"param": Param(
        label="Relevance threshold (f2t)", minimum=0.0, maximum=1.0, step=0.01,
        help="The greedy stops at the first frame whose relevance (1 = the most relevant frame) is below this; "
             "the remaining keyframe slots are spread evenly (the authors: 0.2).")})
    f2f_threshold: float = field(default=0.85, metadata={"param": Param(
        label="Similarity threshold (f2f)", minimum=-1.0, maximum=1.0, step=0.01,
        help="Choosing a keyframe covers every frame whose cosine similarity to it is above this "
             "(the authors: 0.85).")})
    tau: float = field(default=REFERENCE_TAU, metadata={"param": Param(
        label="DFM temperature τ", minimum=0.001, maximum=10.0, step=0.001,
        help="Softmax temperature of the parameter-free DFM weights (0.01 = the reference's initial value; larger "
             "is closer to mean pooling). A learned DFM module uses its own trained τ.")})
    keyframe_quirk: bool = field(default=True, metadata={"param": Param(
        label="Reference DFM anchors (quirk)",
        help="On (the authors' code, which their checkpoint was trained with): frames before the first keyframe are "
             "compared with themselves and frames after keyframe i with frame i of the video. Off: with keyframe 0 "
             "and keyframe i.")})
    dfm: DFMChoice = field(default="auto", metadata={"param": Param(
        label="DFM projections", choices=("auto", "learned", "parameter-free"),
        help="auto: the ViLAMP checkpoint's learned DFM projections when loaded, else parameter-free.")})

    def __post_init__(self) -> None:
        if self.dfm not in ("auto", "learned", "parameter-free"):
            raise UserFacingError(f"Unknown DFM choice {self.dfm!r}: choose auto, learned or parameter-free.")
        if self.k < 1:
            raise UserFacingError("K (keyframes) must be at least 1.")
        if self.tau <= 0:
            raise UserFacingError("The DFM temperature τ must be positive.")


def choose_dfm(ops: ModelOps, params: ViLAMPParams) -> DFMProjection | None:
    """The learned DFM module to use, or None for the parameter-free variant."""
    module = ops.extra_module(EXTRA_MODULE)
    if params.dfm == "parameter-free" or (params.dfm == "auto" and module is None):
        return None
    if module is None:
        raise ModelUnavailable("Learned DFM needs the ViLAMP checkpoint (preset vilamp-7b); the loaded model has no "
                               "DFM weights. Choose DFM projections = auto or parameter-free.")
    return module


def frame_summaries(patches: torch.Tensor, ops: ModelOps, chunk: int = CHUNK_FRAMES) -> torch.Tensor:
    """(T, D_llm) float32: the mean of each frame's projected patches, projected `chunk` frames at a time."""
    out = [ops.project(patches[s : s + chunk].to(ops.device)).float().mean(1) for s in range(0, len(patches), chunk)]
    return torch.cat(out)


def frame_relevance(summaries: torch.Tensor, question: str, ops: ModelOps) -> torch.Tensor:
    """f2t (T,) in [0, 1]: the question's attention over one summary token per frame, divided by its maximum.

    Dividing by the maximum makes the threshold scale-free ("at least a fifth as relevant as the best frame" at
    0.2); ViLAMP's 0.2 was a CLIP cosine, a scale the LLM's attention or embeddings do not share.
    """
    scores = ops.question_attention(summaries.to(ops.dtype), question).float().cpu()
    top = scores.max()
    return scores / top if top > 0 else torch.zeros_like(scores)


def merge_in_chunks(patches: torch.Tensor, frames: np.ndarray, anchors: torch.Tensor, query: torch.Tensor,
                    tau: float, module: DFMProjection | None, ops: ModelOps,
                    chunk: int = CHUNK_FRAMES) -> MergedFrames | None:
    """DFM tokens of `frames` (in that order), projecting each chunk and its anchor frames on the fly."""
    if len(frames) == 0:
        return None
    parts = []
    for start in range(0, len(frames), chunk):
        index = torch.as_tensor(frames[start : start + chunk], dtype=torch.long)
        own = ops.project(patches[index].to(ops.device))
        unique, inverse = torch.unique(anchors[index], return_inverse=True)
        anchor_features = ops.project(patches[unique].to(ops.device))[inverse.to(own.device)]
        parts.append(merge_frames(own, anchor_features, query, tau, module))
    return MergedFrames(torch.cat([p.tokens for p in parts]), torch.cat([p.entropy for p in parts]))


def interleave(key_tokens: torch.Tensor, merged: torch.Tensor | None,
               is_key: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds, frame index of every token) in time order: a keyframe's pooled tokens where it stands, every other
    frame's DFM token where it stands (the reference's [DFM before kf 0] + kf 0 + [DFM strictly between] + …)."""
    per_key = key_tokens.shape[1]
    key = torch.as_tensor(is_key)
    counts = torch.where(key, per_key, 1)
    offsets = torch.cumsum(counts, 0) - counts
    embeds = key_tokens.new_empty(int(counts.sum()), key_tokens.shape[2])
    key_slots = (offsets[key][:, None] + torch.arange(per_key)).reshape(-1)
    embeds[key_slots.to(embeds.device)] = key_tokens.reshape(-1, key_tokens.shape[2])
    if merged is not None:
        embeds[offsets[~key].to(embeds.device)] = merged.to(embeds.dtype)
    return embeds, torch.arange(len(is_key)).repeat_interleave(counts)


@register_backend("vilamp")
class ViLAMP(Backend):
    label = "ViLAMP (DKS + DFM)"
    paper = ("Scaling Video-Language Models to 10K Frames via Hierarchical Differential Distillation "
             "(Cheng et al., 2025)")
    paper_url = "https://arxiv.org/abs/2504.02438"
    description = ("K keyframes chosen for relevance to the question and difference from each other keep all their "
                   "tokens (196/frame); every other frame is merged into one token that weights its patches by "
                   "relevance minus similarity to its keyframe.")
    about = (
        'Keyframes are picked greedily by relevance to the question (stop below 0.2 or at K = 32), skipping '
        'frames too similar (> 0.85) to a chosen one; free slots are spread over the gaps. Keyframes keep all '
        'their tokens; every other frame becomes ONE token, a softmax-weighted mix of its patches (relevance '
        'minus similarity to its keyframe). Quirk kept (switchable): frames are compared with the reference '
        "code's anchors (frame i of the video, not keyframe i), which the checkpoint was trained with."
    )
    Params = ViLAMPParams

    def num_tokens(self, num_frames: int, grid: int, params: ViLAMPParams) -> int:
        # + 1: the reference appends image_newline after the video (its "spatial_unpad" video branch).
        keyframes = min(params.k, num_frames)
        return keyframes * math.ceil(grid / 2) ** 2 + (num_frames - keyframes) + 1

    def compress(self, features: FrameFeatures, question: str, ops: ModelOps, params: ViLAMPParams) -> VisualTokens:
        """Marks: "f2t" (relevance, 1 = most relevant frame), "keyframe" (0/1), "relevance_keyframe" (chosen by the
        greedy rather than by gap filling), "dfm_entropy" (entropy of a merged frame's patch weights / log P)."""
        module = choose_dfm(ops, params)
        patches, frames = features.patches, features.num_frames
        summaries = frame_summaries(patches, ops)
        f2t = frame_relevance(summaries, question, ops)
        selection = select_keyframes(f2t, SummarySimilarity(summaries).row, params.k, params.f2t_threshold,
                                     params.f2f_threshold)
        is_key = selection.mask(frames)
        keyframes = torch.as_tensor(selection.keyframes, dtype=torch.long)
        key_tokens = bilinear_pool_2x(ops.project(patches[keyframes].to(ops.device)), features.grid)
        query = ops.embed_text(question).float().mean(0)
        anchors = anchor_frames(selection.keyframes, frames, params.keyframe_quirk)
        merged = merge_in_chunks(patches, np.flatnonzero(~is_key), anchors, query, params.tau, module, ops)
        embeds, frame_of_token = interleave(key_tokens, merged.tokens if merged else None, is_key)
        newline = ops.image_newline()[None].to(embeds.device, embeds.dtype)
        span = torch.stack([frame_of_token, frame_of_token], dim=1)
        entropy = np.zeros(frames)  # keyframes keep all their tokens: no DFM weights, 0 by convention
        if merged is not None:
            entropy[~is_key] = merged.entropy.cpu().numpy()
        greedy = np.zeros(frames)
        greedy[selection.greedy] = 1.0
        return VisualTokens(
            embeds=torch.cat([embeds, newline]),
            frame_span=torch.cat([span, torch.tensor([[-1, -1]])]),
            plan=DensePlan(),
            frame_marks={"f2t": f2t.double().numpy(), "keyframe": is_key.astype(np.float64),
                         "relevance_keyframe": greedy, "dfm_entropy": entropy},
            notes=self._notes(module, query, params),
        )

    @staticmethod
    def _notes(module: DFMProjection | None, query: torch.Tensor, params: ViLAMPParams) -> list[str]:
        notes = [RELEVANCE_NOTE]
        if module is None:
            notes.append(f"parameter-free DFM (no ViLAMP DFM weights loaded): cosine scores of the projected "
                         f"features, τ = {params.tau:g}")
        elif not module.accepts_query(query):
            notes.append(f"learned DFM keyframe term; its query term is parameter-free: the checkpoint's query "
                         f"projection expects {module.query_dim}-d CLIP text embeddings, which this engine does not "
                         f"compute")
        if not params.keyframe_quirk:
            notes.append("corrected DFM anchors (reference quirk off): not what the ViLAMP checkpoint was trained with")
        return notes
