"""What the page says about the methods: selector labels, a one-line overview and the About panel."""

from __future__ import annotations

from backends.base import param_field_info
from backends.registry import get_backend, list_backends
from ui.summary import uniform_tokens

ABOUT_FRAMES = 64


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
            b.about or b.description,
            "",
            f"Visual tokens at {ABOUT_FRAMES} frames: **{count:,}**{share}.",
            *(["", "Parameters:", *params] if params else []),
        ]))
    return "\n\n".join(sections)
