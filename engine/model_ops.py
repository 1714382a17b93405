"""`ModelOps` over a loaded checkpoint: the only door through which backends touch the model."""

from __future__ import annotations

import torch
from torch import nn

from engine.loading import LoadedModel
from engine.prefill import LayerRunner, dense_prefill
from engine.sequence import build_sequence, render_prompt, text_ids
from engine.types import VisualTokens


def token_scores(probe, seq) -> torch.Tensor:
    """Mean over layers of the question's attention, per visual token, normalised to sum to 1."""
    layers = [s for s in probe.mean_rows if s is not None]
    per_position = torch.stack([s.cpu() for s in layers]).mean(0)
    visual = seq.visual_index >= 0
    n_tokens = int(seq.visual_index.max()) + 1 if visual.any() else 0
    scores = torch.zeros(n_tokens)
    scores.index_add_(0, seq.visual_index[visual], per_position[visual.nonzero().flatten()])
    total = scores.sum()
    return scores / total if total > 0 else scores


class LoadedModelOps:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.runner = LayerRunner(loaded.model)

    @property
    def grid(self) -> int:
        return self.loaded.grid

    @property
    def vision_heads(self) -> int:
        return self.loaded.model.config.vision_config.num_attention_heads

    @property
    def device(self) -> torch.device:
        return self.loaded.model.model.multi_modal_projector.linear_1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    @torch.inference_mode()
    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.loaded.model.model.multi_modal_projector(vision_features.to(self.device, self.dtype))

    def image_newline(self) -> torch.Tensor:
        return self.loaded.model.model.image_newline.to(self.device, self.dtype)

    @torch.inference_mode()
    def embed_text(self, text: str) -> torch.Tensor:
        return self.runner.embed(text_ids(self.loaded.tokenizer, text))

    def prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        before, after = render_prompt(self.loaded.chat_template, question)
        return text_ids(self.loaded.tokenizer, before), text_ids(self.loaded.tokenizer, after)

    def sequence(self, tokens: VisualTokens, question: str):
        prefix_ids, question_ids = self.prompt_ids(question)
        return build_sequence(tokens, prefix_ids, question_ids, self.runner.embed,
                              lambda text: text_ids(self.loaded.tokenizer, text))

    @torch.inference_mode()
    def question_attention(self, tokens: torch.Tensor, question: str) -> torch.Tensor:
        span = torch.full((tokens.shape[0], 2), -1)
        seq = self.sequence(VisualTokens(embeds=tokens.to(self.device, self.dtype), frame_span=span), question)
        result = dense_prefill(self.runner, seq)
        return token_scores(result.probe, seq)

    def extra_module(self, name: str) -> nn.Module | None:
        return self.loaded.extra_modules.get(name)
