"""Assemble the LLM input: chat-templated prefix, the backend's visual tokens with their text markers, the question."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.types import VisualTokens

PREFIX, MARKER, VISUAL, QUESTION = 0, 1, 2, 3
VIDEO_PLACEHOLDER = "<video>"


@dataclass
class Sequence:
    """The full prompt as embeddings, with what every position is (`kind`), which visual token it is
    (`visual_index`, -1 if none) and which prefill block it belongs to (`block`, -1 for prefix/question)."""

    embeds: torch.Tensor
    kind: torch.Tensor
    visual_index: torch.Tensor
    block: torch.Tensor
    question_start: int

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])


def render_prompt(chat_template: str, question: str) -> tuple[str, str]:
    """The chat template rendered for one user turn (video + question), split around the video placeholder."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = env.from_string(chat_template).render(messages=messages, add_generation_prompt=True)
    if text.count(VIDEO_PLACEHOLDER) != 1:
        raise ValueError("the chat template must render exactly one <video> placeholder")
    before, after = text.split(VIDEO_PLACEHOLDER)
    return before, after


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def build_sequence(tokens: VisualTokens, prefix_ids: list[int], question_ids: list[int], embed,
                   marker_ids) -> Sequence:
    """`embed(ids) -> (n, D)`; `marker_ids(text) -> ids`. Markers go right before the visual token they name."""
    device, dtype = tokens.embeds.device, tokens.embeds.dtype
    parts, kinds, vis_index, blocks = [], [], [], []
    token_block = tokens.block if tokens.block is not None else torch.full((tokens.num_tokens,), -1)

    def add(embeds: torch.Tensor, kind: int, index: torch.Tensor, block: torch.Tensor) -> None:
        parts.append(embeds.to(device, dtype))
        kinds.append(torch.full((embeds.shape[0],), kind, dtype=torch.int8))
        vis_index.append(index)
        blocks.append(block)

    add(embed(prefix_ids), PREFIX, torch.full((len(prefix_ids),), -1), torch.full((len(prefix_ids),), -1))
    cuts = sorted(tokens.markers) + [(tokens.num_tokens, None)]
    start = 0
    for position, text in cuts:
        if position > start:
            add(tokens.embeds[start:position], VISUAL, torch.arange(start, position), token_block[start:position])
        if text is not None:
            ids = marker_ids(text)
            block = int(token_block[position]) if position < tokens.num_tokens else -1
            add(embed(ids), MARKER, torch.full((len(ids),), -1), torch.full((len(ids),), block))
        start = max(start, position)
    question_start = sum(p.shape[0] for p in parts)
    add(embed(question_ids), QUESTION, torch.full((len(question_ids),), -1), torch.full((len(question_ids),), -1))
    return Sequence(
        embeds=torch.cat(parts),
        kind=torch.cat(kinds),
        visual_index=torch.cat(vis_index).long(),
        block=torch.cat(blocks).long(),
        question_start=question_start,
    )
