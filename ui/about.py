"""What the page says about the methods: selector labels, a one-line overview and the About panel."""

from __future__ import annotations

from backends.base import param_field_info
from backends.registry import get_backend, list_backends
from ui.summary import uniform_tokens

ABOUT_FRAMES = 64

# What the built-in methods do to the tokens and which of the authors' quirks are kept (DESIGN.md, "Reference facts").
# A third-party backend is described by its own label, paper and description only.
TOKEN_NOTES = {
    "uniform": (
        "Every sampled frame goes through the projector and a 2×2 bilinear pool (27×27 → 14×14 = 196 tokens per "
        "frame at 384 px); one learned newline token closes the video. Nothing is dropped: the reference point "
        "for every ratio on this page."
    ),
    "videoxl2": (
        "Frames are grouped by 4 (the last frame repeated to fill a group) and fused into one 24×24 map, projected "
        "and 2×2 average-pooled: 144 tokens per 4 frames, each group after a `Time t s:` marker. The video is "
        "prefilled block by block (a block sees itself, a few previous blocks, the prefix and the markers); after "
        "prefill only the blocks the question is about keep full KV, the others are pooled. Quirks kept: the fusion "
        "module reads a raw reshape (its \"time\" axis runs over channels), as the released weights require; its "
        "temporal attention uses the query at the key position. Without the Video-XL-2 weights the fusion is "
        "parameter-free and labelled so."
    ),
    "vilamp": (
        "Keyframes are picked greedily by relevance to the question (stop below 0.2 or at K = 32), skipping frames "
        "too similar (> 0.85) to a chosen one; free slots are spread over the gaps. Keyframes keep all their "
        "tokens; every other frame becomes ONE token, a softmax-weighted mix of its patches (relevance minus "
        "similarity to its keyframe). Quirk kept (switchable): frames are compared with the reference code's "
        "anchors (frame i of the video, not keyframe i), which the checkpoint was trained with."
    ),
    "hico": (
        "Clips of 4 frames are merged by bipartite soft matching (ToMe, size-weighted) before the projector, "
        "down to 16 tokens per frame; inside the language model the least-attended visual tokens are dropped at "
        "chosen layers (PyramidDrop-style). Quirk kept: a clip's merged tokens come out as the unmerged tokens of "
        "one side in descending match score, then the other side's tokens in their original order, as the "
        "authors' code emits them."
    ),
}


def backend_choices() -> list[tuple[str, str]]:
    """(label, name) of every registered backend, for the method selector."""
    return [(get_backend(name).label, name) for name in list_backends()]


def overview_markdown() -> str:
    """One line per registered backend: label, what it does, and its paper."""
    lines = []
    for name in list_backends():
        b = get_backend(name)
        paper = f" — [{b.paper}]({b.paper_url})" if b.paper_url else (f" — {b.paper}" if b.paper else "")
        lines.append(f"- **{b.label}**: {b.description}{paper}")
    return "\n".join(lines)


def about_markdown(grid: int) -> str:
    """Every method: paper link, what it does to the tokens, its budget at ABOUT_FRAMES frames, its parameters."""
    baseline = uniform_tokens(ABOUT_FRAMES, grid)
    sections = [(
        "All methods run on the same loaded vision-language model: the video is decoded and encoded once, then "
        "each method turns the same frame features into the tokens the language model reads. Attention plots show "
        "the question's attention over the visual tokens, averaged over layers and mapped back to the frames each "
        "token stands for."
    )]
    for name in list_backends():
        b = get_backend(name)
        count = b.num_tokens(ABOUT_FRAMES, grid, b.make_params())
        share = f" ({100 * count / baseline:.0f}% of uniform)" if baseline and name != "uniform" else ""
        paper = f"[{b.paper}]({b.paper_url})" if b.paper_url else b.paper
        params = [f"  - *{p.label}* (`{field}`, default `{default}`): {p.help}"
                  for field, default, p in param_field_info(b.Params)]
        sections.append("\n".join([
            f"### {b.label}",
            f"{paper}" if paper else "",
            "",
            TOKEN_NOTES.get(name, b.description),
            "",
            f"Visual tokens at {ABOUT_FRAMES} frames: **{count:,}**{share}.",
            *(["", "Parameters:", *params] if params else []),
        ]))
    return "\n\n".join(sections)
