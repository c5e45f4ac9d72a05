"""The comparison table (markdown and JSON) and its plots (PNG, matplotlib Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sku_fast.engine.strict_json import to_json

# (key, header, kind): kind "pct" prints a rate as a percentage, "num" a number
COLUMNS = (
    ("steps", "steps", "int"),
    ("train_seconds", "train s", "int"),
    ("harmful_rate", "harmful ↓", "pct"),
    ("refusal_rate", "refusal", "pct"),
    ("degenerate_rate", "degenerate", "pct"),
    ("off_topic_rate", "off-topic", "pct"),
    ("over_refusal_rate", "over-refusal ↓", "pct"),
    ("distinct_2", "distinct-2 ↑", "num"),
    ("fluency_ppl", "fluency ppl ↓", "num"),
    ("normal_nll", "normal NLL ↓", "num"),
    ("similarity", "similarity ↑", "num"),
)
ABLATION = ("sku", "sku-no-gd", "sku-no-rd", "sku-no-pd")


def _cell(value: float | None, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "" if kind == "int" else "n/a"
    if kind == "int":
        return f"{value:.0f}"
    return f"{100 * value:.1f}%" if kind == "pct" else f"{value:.3f}"


def table_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The papers' table: one row per variant, harm on the left, utility on the right."""
    header = "| variant | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [
        f"Model: {meta['model']}; {meta['steps']} steps, seed {meta['seed']}, "
        f"{'LoRA' if meta['lora'] else 'full fine-tuning'}; judge `{meta['judge']}`; "
        f"{meta['decoding']} decoding, {meta['max_new_tokens']} new tokens; prompts: "
        + ", ".join(f"{count} {name}" for name, count in meta["n"].items())
        + f". Similarity: {meta['similarity_method']}, to the original's generations.",
        "",
        header,
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        cells = [_cell(row.get(key), kind) for key, _, kind in COLUMNS]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "harmful/refusal/degenerate/off-topic: categories of the responses to harmful prompts "
        "(they add up to 100% with the rule judge). over-refusal: refusals of harmless "
        "prompts. distinct-2, fluency (perplexity of the generations under the original "
        "model), normal NLL (of the reference answers) and similarity: normal prompts.",
        "",
    ]
    return "\n".join(lines)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_harm_vs_utility(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Harmful rate (x) against two utility measures (y), one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("normal_nll", "normal-answer NLL (lower is better)"),
        ("similarity", "similarity to original (higher is better)"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (key, title) in zip(axes, panels, strict=True):
        # variants at the same point (e.g. a baseline that did not move) share one label
        shown = [r for r in rows if _finite(r["harmful_rate"]) and _finite(r.get(key))]
        ys = [r[key] for r in shown]
        step = (max(ys) - min(ys)) / 50 if len(ys) > 1 and max(ys) > min(ys) else 1.0
        points: dict[tuple[int, int], list[tuple[float, float, str]]] = {}
        for i, row in enumerate(rows):
            if row not in shown:
                continue
            x, y = 100 * row["harmful_rate"], row[key]
            ax.scatter(x, y, s=60, color=f"C{i}", zorder=3)
            points.setdefault((round(x), round(y / step)), []).append((x, y, row["variant"]))
        for k, group in enumerate(sorted(points.values(), key=lambda g: (g[0][1], g[0][0]))):
            x, y, _ = group[0]
            label = ", ".join(name for _, _, name in group)
            offset = (6, 4) if k % 2 == 0 else (6, -12)  # neighbours' labels alternate
            ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=9)
        ax.set_xlabel("harmful rate on harmful prompts, % (lower is better)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.set_xlim(-5, 105)
    fig.suptitle("What unlearning bought (x) and what it cost (y)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ablation(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """SKU against SKU without each module: response categories and utility. False (no file)
    when the comparison has fewer than two of the ablation variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {row["variant"]: row for row in rows}
    names = [name for name in ABLATION if name in by_name]
    if len(names) < 2:
        return False
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4.5))
    rates = (("harmful_rate", "harmful"), ("refusal_rate", "refusal"))
    rates += (("degenerate_rate", "degenerate"), ("off_topic_rate", "off-topic"))
    width = 0.8 / len(rates)
    for k, (key, label) in enumerate(rates):
        values = [100 * (by_name[n][key] or 0.0) for n in names]
        left.bar([i + k * width for i in range(len(names))], values, width, label=label)
    left.set_title("responses to harmful prompts, %")
    left.set_ylim(0, 125)  # head room for the legend above the bars
    left.legend(fontsize=8, ncol=4, loc="upper center")
    original = by_name.get("original")
    for ax, key, title in (
        (middle, "similarity", "similarity to original ↑"),
        (right, "normal_nll", "normal-answer NLL ↓"),
    ):
        values = [by_name[n][key] if _finite(by_name[n][key]) else 0.0 for n in names]
        bars = ax.bar(range(len(names)), values, 0.6, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)  # differences are often in the 2nd decimal
        if original is not None and _finite(original[key]):
            ax.axhline(original[key], color="black", linestyle="--", linewidth=1, label="original")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_title(title)
    for ax, offset in ((left, width * (len(rates) - 1) / 2), (middle, 0.0), (right, 0.0)):
        ax.set_xticks([i + offset for i in range(len(names))])
        ax.set_xticklabels(names, rotation=15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("SKU ablation: each module switched off in turn")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(out: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[Path]:
    """table.md, table.json and the PNG plots in `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "table.md", out / "table.json", out / "harm_vs_utility.png"]
    written[0].write_text(table_markdown(rows, meta))
    written[1].write_text(to_json({"meta": meta, "rows": list(rows)}, indent=2) + "\n")
    plot_harm_vs_utility(rows, written[2])
    if plot_ablation(rows, out / "ablation.png"):
        written.append(out / "ablation.png")
    return written


# the sweep's left panel: (row key, label, colour); over-refusal is of the harmless prompts
_SWEEP_HARM_SERIES = (
    ("harmful_rate", "harmful", "C3"),
    ("over_refusal_rate", "over-refusal", "C2"),
    ("off_topic_rate", "off-topic", "C7"),
    ("degenerate_rate", "degenerate", "C4"),
)


def plot_lambda_sweep(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Harm (left) and utility (right) against λ, the original as a dashed line in each; a
    sweep over the twin weight c draws one line per c (marker and label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    original, swept = rows[0], rows[1:]
    contrasts = sorted({r.get("contrast") for r in swept}, key=lambda c: -1 if c is None else c)
    markers = "os^vDP*X"
    fig, (harm, utility) = plt.subplots(1, 2, figsize=(11, 4.2))
    nll = utility.twinx()
    for i, contrast in enumerate(contrasts):
        group = [r for r in swept if r.get("contrast") == contrast]
        lams = [r["lambda"] for r in group]
        style = markers[i % len(markers)] + "-"
        tag = f" (c = {contrast:g})" if len(contrasts) > 1 else ""
        for key, label, color in _SWEEP_HARM_SERIES:
            if key in original:
                harm.plot(lams, [100 * r[key] for r in group], style, color=color,
                          label=label + tag)  # fmt: skip
        utility.plot(lams, [r["similarity"] for r in group], style, color="C0",
                     label="similarity" + tag)  # fmt: skip
        nll.plot(lams, [r["normal_nll"] for r in group], style, color="C1", alpha=0.7,
                 label="normal NLL" + tag)  # fmt: skip
    for key, _, color in _SWEEP_HARM_SERIES:
        if key in original:
            harm.axhline(100 * original[key], color=color, ls="--", lw=0.8)
    harm.set_ylabel("% of answers (over-refusal: of harmless prompts)")
    harm.set_title("what negation bought (dashed: the original)")
    utility.axhline(original["similarity"], color="C0", ls="--", lw=0.8)
    utility.set_ylabel("similarity to the original (higher is better)", color="C0")
    nll.axhline(original["normal_nll"], color="C1", ls="--", lw=0.8)
    nll.set_ylabel("normal-answer NLL (lower is better)", color="C1")
    utility.set_title("what it cost")
    lams = sorted({r["lambda"] for r in swept})
    for ax in (harm, utility):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lams, [f"{v:g}" for v in lams])
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
    # below the panels, one column per c, so that the legend hides no line
    columns = len(contrasts)
    harm.legend(fontsize=7, ncol=columns, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    if columns > 1:
        utility.legend(fontsize=7, ncol=columns, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
