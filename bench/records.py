"""Pipeline result records and what is judged from them: per-stage statistics, each cell's figures and ratios to
the naive row, the three-backends-on-one-upload rows, and issue 8's targets. Pure: no model, no torch."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import fmt_bytes, fmt_seconds, median

NAIVE = "naive"
ARENA_BACKENDS = ("videoxl2", "vilamp", "hico")
BASELINE = "uniform"
# Stages before the first token, in pipeline order; "generate" follows.
FIRST_TOKEN_STAGES = ("decode", "encode", "compress", "prefill")
FIGURES = ("to_first_token_s", "ttft_s", "answer_s", "decode_tokens_per_s", "peak_bytes", "visual_tokens")


@dataclass
class StageStat:
    """One stage over the recorded runs: median seconds, every sample, and the largest memory reading."""

    name: str
    seconds: float
    samples: list[float]
    peak_bytes: int
    memory_kind: str


@dataclass
class Cell:
    """One measured (frame count, attention implementation, backend) — `backend` "naive" is plain transformers."""

    frames: int
    attention: str
    backend: str
    status: str = "ok"
    error: str | None = None
    stages: list[StageStat] = field(default_factory=list)
    visual_tokens: int | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    answer: str | None = None
    repeats: int = 0
    reserved_bytes: int | None = None


def summarise(runs: list[list[Any]]) -> list[StageStat]:
    """StageProbe lists of several runs → one StageStat per stage name, in first-seen order."""
    names: list[str] = []
    for run in runs:
        names += [s.name for s in run if s.name not in names]
    stats = []
    for name in names:
        probes = [s for run in runs for s in run if s.name == name]
        samples = [p.seconds for p in probes]
        stats.append(StageStat(name, median(samples), samples, max(p.peak_bytes for p in probes),
                               probes[0].memory_kind))
    return stats


def figures(record: dict[str, Any]) -> dict[str, float | int | None]:
    """Summary figures of one cell record: time to first token from the frames (`to_first_token_s`) and from the
    features (`ttft_s`: compress + prefill, naive: its LLM prefill), the whole answer, decode rate, peak memory."""
    empty = {k: None for k in FIGURES}
    if record["status"] != "ok":
        return empty
    seconds = {s["name"]: s["seconds"] for s in record["stages"]}
    first = sum(v for k, v in seconds.items() if k in FIRST_TOKEN_STAGES)
    generate = seconds.get("generate")
    new_tokens = record.get("new_tokens") or 0
    return {
        "to_first_token_s": first,
        "ttft_s": sum(v for k, v in seconds.items() if k in ("compress", "prefill")),
        "answer_s": first + (generate or 0.0),
        "decode_tokens_per_s": new_tokens / generate if new_tokens and generate else None,
        "peak_bytes": max((s["peak_bytes"] for s in record["stages"]), default=None),
        "visual_tokens": record.get("visual_tokens"),
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def ratios_to_naive(record: dict[str, Any], naive: dict[str, Any] | None) -> dict[str, float | None]:
    """Each figure and each stage's seconds divided by the naive row's same figure (None where either is missing)."""
    if naive is None:
        return {}
    out = {k: ratio(record["figures"][k], naive["figures"][k]) for k in FIGURES}
    naive_stages = {s["name"]: s["seconds"] for s in naive["stages"]} if naive["status"] == "ok" else {}
    for s in record["stages"] if record["status"] == "ok" else []:
        if s["name"] in naive_stages:
            out[f"{s['name']}_s"] = ratio(s["seconds"], naive_stages[s["name"]])
    return out


def to_records(cells: list[Cell]) -> list[dict[str, Any]]:
    """Cells as JSON-ready dicts with their figures and ratios to the naive row of the same frames and attention."""
    records = [asdict(c) for c in cells]
    for r in records:
        r["figures"] = figures(r)
    naive = {(r["frames"], r["attention"]): r for r in records if r["backend"] == NAIVE}
    for r in records:
        r["vs_naive"] = ratios_to_naive(r, naive.get((r["frames"], r["attention"])))
    return records


def arena_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Three backends on one upload: the shared stages (decode, encode) once plus each backend's own stages,
    against each backend alone (its answer time with the shared stages), for every frame count where all ran."""
    rows = []
    keys = sorted({(r["frames"], r["attention"]) for r in records})
    for frames, attention in keys:
        picked = {r["backend"]: r for r in records if (r["frames"], r["attention"]) == (frames, attention)}
        if not all(picked.get(b, {}).get("status") == "ok" for b in ARENA_BACKENDS):
            continue
        shared = sum(s["seconds"] for s in picked[ARENA_BACKENDS[0]]["stages"] if s["name"] in ("decode", "encode"))
        alone = [picked[b]["figures"]["answer_s"] for b in ARENA_BACKENDS]
        together = shared + sum(a - shared for a in alone)
        rows.append({
            "frames": frames, "attention": attention, "backends": list(ARENA_BACKENDS), "shared_s": shared,
            "alone_s": alone, "together_s": together,
            "vs_mean_alone": together / statistics.mean(alone), "vs_slowest_alone": together / max(alone),
            "vs_fastest_alone": together / min(alone),
        })
    return rows


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    key: str
    goal: str
    status: str  # "met" | "not met" | "not measured"
    measured: str


def _is_7b(config: dict[str, Any]) -> bool:
    return config.get("model", {}).get("llm_hidden") == 3584


def _merged(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every cell of every payload, each with its file's environment and config attached."""
    return [{**r, "file": i, "env": p["environment"], "config": p["config"]}
            for i, p in enumerate(payloads) for r in p["cells"]]


def target_a(cells: list[dict[str, Any]]) -> Target:
    goal = "2,048 frames, decode excluded: encode+compress+prefill ≤ 5 s for videoxl2 (7B shapes, one H100, bf16)"
    rows = [c for c in cells if c["backend"] == "videoxl2" and c["frames"] == 2048 and not c["config"].get("video")]
    if not rows:
        return Target("a", goal, "not measured", "no videoxl2 cell at 2,048 frames")
    ok = [c for c in rows if c["status"] == "ok"]
    eligible = [c for c in ok if _is_7b(c["config"]) and "H100" in c["env"]["device"]
                and c["config"].get("dtype") == "bf16"]
    if not eligible:
        seen = ", ".join(f"{c['status']} on {c['env']['device']} ({c['config'].get('preset')}, "
                         f"{c['config'].get('dtype')}): {fmt_seconds(c['figures']['to_first_token_s'])} s"
                         for c in rows)
        return Target("a", goal, "not measured", f"no 7B/bf16/H100 run; seen: {seen}")
    best = min(eligible, key=lambda c: c["figures"]["to_first_token_s"])
    value = best["figures"]["to_first_token_s"]
    return Target("a", goal, "met" if value <= 5.0 else "not met",
                  f"{value:.2f} s ({best['attention']}, {best['env']['device']})")


def target_b(cells: list[dict[str, Any]], limit_bytes: float = 80e9) -> Target:
    """Every compressing backend at 10,000 frames: ran, and its allocator peak and reserve stay ≤ 80 GB. `uniform`
    (LLaVA-OneVision's own path, ~2M tokens at 10,000 frames) is the uncompressed baseline: shown, not counted."""
    goal = "10,000 frames fit in 80 GB for every backend (7B shapes, CUDA; uniform baseline not counted)"
    rows = [c for c in cells if c["frames"] == 10000 and c["backend"] != NAIVE and _is_7b(c["config"])
            and c["env"]["device_type"] == "cuda"]
    if not [c for c in rows if c["backend"] != BASELINE]:
        return Target("b", goal, "not measured", "no 7B CUDA cell of a compressing backend at 10,000 frames")
    verdicts: dict[str, tuple[bool, str, int]] = {}
    for c in rows:
        used = max(c["figures"]["peak_bytes"] or 0, c.get("reserved_bytes") or 0)
        fits = c["status"] == "ok" and used <= limit_bytes
        if c["backend"] not in verdicts or fits:
            verdicts[c["backend"]] = (fits, c["status"], used)
    text = ", ".join(f"{b}{' (baseline)' if b == BASELINE else ''}: {s}{'' if s != 'ok' else ' ' + fmt_bytes(u)}"
                     for b, (_, s, u) in verdicts.items())
    counted = [f for b, (f, _, _) in verdicts.items() if b != BASELINE]
    return Target("b", goal, "met" if all(counted) else "not met", text)


def _target_setting(cell: dict[str, Any]) -> bool:
    """The setting issue 8's targets are stated for: 7B shapes on a CUDA device."""
    return _is_7b(cell["config"]) and cell["env"]["device_type"] == "cuda"


def _where(cell: dict[str, Any]) -> str:
    return f"{cell['config'].get('preset')} on {cell['env']['device']}"


def target_c(cells: list[dict[str, Any]]) -> Target:
    goal = f"{', '.join(ARENA_BACKENDS)} side by side on one upload ≤ 1.4× the time of one (shared encode)"
    by_file: dict[int, list[dict[str, Any]]] = {}
    for c in cells:
        by_file.setdefault(c["file"], []).append(c)
    rows = [(row, group[0]) for group in by_file.values() for row in arena_rows(group)]
    rows = [r for r in rows if _target_setting(r[1])] or rows
    if not rows:
        return Target("c", goal, "not measured", f"no frame count where {', '.join(ARENA_BACKENDS)} all ran")
    at_2048 = [r for r in rows if r[0]["frames"] == 2048]
    row, where = min(at_2048 or [max(rows, key=lambda r: r[0]["frames"])], key=lambda r: r[0]["vs_mean_alone"])
    value = row["vs_mean_alone"]
    return Target("c", goal, "met" if value <= 1.4 else "not met",
                  f"×{value:.2f} of one backend alone (mean; ×{row['vs_slowest_alone']:.2f} of the slowest, "
                  f"×{row['vs_fastest_alone']:.2f} of the fastest) at {row['frames']} frames, {row['attention']}, "
                  f"{_where(where)}")


def target_d(cells: list[dict[str, Any]]) -> Target:
    goal = "engine `uniform` within 5 % of plain transformers on the same tokens (decode excluded → first token)"
    pairs = []
    naive = {(c["file"], c["frames"], c["attention"]): c for c in cells if c["backend"] == NAIVE}
    for c in cells:
        other = naive.get((c["file"], c["frames"], c["attention"]))
        if c["backend"] == "uniform" and c["status"] == "ok" and other and other["status"] == "ok":
            pairs.append((c, other))
    pairs = [p for p in pairs if _target_setting(p[0])] or pairs
    if not pairs:
        return Target("d", goal, "not measured", "no frame count where uniform and naive both ran")
    worst = max(pairs, key=lambda p: p[0]["vs_naive"]["to_first_token_s"])[0]
    mismatched = [c["frames"] for c, n in pairs if c["prompt_tokens"] != n["prompt_tokens"]]
    worst_ratio = worst["vs_naive"]["to_first_token_s"]
    measured = (f"worst ×{worst_ratio:.2f} at {worst['frames']} frames ({worst['attention']}, {_where(worst)}); "
                f"over {len(pairs)} frame count(s)")
    if mismatched:
        measured += f"; prompt lengths differ at {mismatched}"
    return Target("d", goal, "met" if worst_ratio <= 1.05 and not mismatched else "not met", measured)


def check_targets(payloads: list[dict[str, Any]]) -> list[Target]:
    """Issue 8's targets (a)–(d) over the cells of one or more result files."""
    cells = _merged(payloads)
    return [target_a(cells), target_b(cells), target_c(cells), target_d(cells)]


def targets_text(targets: list[Target]) -> str:
    return "\n".join(f"({t.key}) {t.goal}\n    {t.status.upper()}: {t.measured}" for t in targets)
