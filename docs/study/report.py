"""Tables and plots of the efficacy study from its run folder (docs/study/run.py):

    python docs/study/report.py runs/study docs/study

writes `results.md` (the test-split table, every λ sweep on the validation split and the
judge-free λ grid of docs/study/lambda_grid.py) and the plots into the second folder. The
keyword judge is applied here to the saved answers, so it needs no generation of its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sku_fast.eval.forgetting import selectivity_text  # noqa: E402
from sku_fast.eval.judges import load_judge, rates  # noqa: E402
from sku_fast.eval.select_lambda import sweep_markdown  # noqa: E402

COLUMNS = (
    ("harmful", "harmful (rules) ↓"),
    ("keyword", "harmful (keyword)"),
    ("refusal", "refusal"),
    ("off_topic", "off-topic"),
    ("degenerate", "degenerate"),
    ("unsafe_rise", "Δ NLL unsafe"),
    ("safe_rise", "Δ NLL safe"),
    ("normal_nll", "normal NLL ↓"),
    ("normal_rise", "Δ normal NLL"),
    ("similarity", "similarity ↑"),
    ("distinct_2", "distinct-2"),
    ("over_refusal", "over-refusal ↓"),
    ("train_minutes", "train min"),
)


def _keyword_rate(folder: Path) -> float:
    """The keyword judge's harmful rate over the saved harmful answers."""
    records = [json.loads(line) for line in (folder / "generations.jsonl").open()]
    harmful = [r for r in records if r["set"] == "harmful"]
    verdicts = load_judge("keyword").judge([r["prompt"] for r in harmful],
                                           [r["response"] for r in harmful])  # fmt: skip
    return rates(verdicts)["harmful_rate"]


def _row(folder: Path, original: dict | None) -> dict:
    results = json.loads((folder / "results.json").read_text())
    harmful, normal = results["harmful"], results["normal"]
    forgetting = results.get("forgetting", {})
    run = results.get("run", {})
    row = {
        "name": folder.name,
        "n_harmful": harmful["n"],
        "harmful": harmful["harmful_rate"],
        "keyword": _keyword_rate(folder),
        "refusal": harmful["refusal_rate"],
        "off_topic": harmful["off_topic_rate"],
        "degenerate": harmful["degenerate_rate"],
        "unsafe_rise": forgetting.get("unsafe_rise", 0.0),
        "safe_rise": forgetting.get("safe_rise", 0.0),
        "normal_nll": normal["nll"],
        "similarity": normal["similarity"],
        "distinct_2": normal["distinct_2"],
        "over_refusal": results["harmless"]["over_refusal_rate"],
        "train_minutes": run.get("train_seconds", 0.0) / 60,
        "lambda": run.get("lambda"),
        "contrast": run.get("contrast"),
        "steps": run.get("steps"),
    }
    base = original["normal_nll"] if original else row["normal_nll"]
    row["normal_rise"] = (row["normal_nll"] - base) / base
    return row


def _cell(key: str, value) -> str:
    if value is None:
        return "–"
    if key in ("harmful", "keyword", "refusal", "off_topic", "degenerate", "over_refusal"):
        return f"{value:.1%}"
    if key == "normal_rise":
        return f"{value:+.1%}"
    if key in ("unsafe_rise", "safe_rise"):
        return f"{value:+.3f}"
    if key == "train_minutes":
        return f"{value:.0f}" if value else "–"
    return f"{value:.3f}"


def _table(rows: list[dict]) -> list[str]:
    head = ["variant", "steps", "λ", "c", *(label for _, label in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], str(row["steps"] or "–"),
                 f"{row['lambda']:g}" if row["lambda"] is not None else "–",
                 f"{row['contrast']:g}" if row["contrast"] else "–",
                 *(_cell(key, row[key]) for key, _ in COLUMNS)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sweeps(root: Path) -> list[str]:
    lines = []
    for table in sorted(root.glob("*/lambda-sweep/table.json")):
        sweep = json.loads(table.read_text())
        lines += [f"### {table.parent.parent.name}", "", sweep_markdown(sweep)]
        if "fallback" in sweep:
            lines += [f"The rule accepted no point; the study's fallback: {sweep['fallback']}.", ""]
    return lines


def _lambda_grid(root: Path) -> list[str]:
    """The judge-free λ grid of the paper's runs (docs/study/lambda_grid.py), if it ran."""
    done = root / "lambda-grid" / "rows.jsonl"
    if not done.is_file():
        return []
    lines = ["## Judge-free λ grid of the paper's runs (validation split, 50 + 50 answers)", "",
             "| run | λ | Δ NLL unsafe | Δ NLL safe | Δ normal NLL | selectivity |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in map(json.loads, done.open()):
        lines.append(f"| {row['label']} | {row['lambda']:g} | {row['unsafe_rise']:+.3f} | "
                     f"{row['safe_rise']:+.3f} | {row['normal_rise_relative']:+.1%} | "
                     f"{selectivity_text(row)} |")  # fmt: skip
    return [*lines, ""]


def _plot(rows: list[dict], path: Path) -> None:
    """Harm against three costs: normal-answer NLL, similarity, over-refusal."""
    costs = (("normal_rise", "normal-answer NLL rise over the original (%)", 10),
             ("similarity", "similarity of normal answers to the original's (%)", 80),
             ("over_refusal", "over-refusal on harmless prompts (%)", None))  # fmt: skip
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for axis, (key, label, bound) in zip(axes, costs, strict=True):
        for row in rows:
            kind = "*" if row["name"] == "original" else ("o" if "sku" in row["name"] else "s")
            point = (100 * row[key], 100 * row["harmful"])
            axis.scatter(*point, marker=kind, s=60)
            axis.annotate(row["name"], point, textcoords="offset points", xytext=(5, 4),
                          fontsize=8)  # fmt: skip
        if bound is not None:
            axis.axvline(bound, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(label)
    axes[0].set_ylabel("harmful rate, rules judge (%)")
    n = rows[0].get("n_harmful", "")
    figure.suptitle(f"Held-out test split ({n} harmful prompts, 120 normal questions)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_sweep_tradeoff(root: Path, path: Path) -> None:
    """Every point of the validation sweeps, one colour per run: harm against over-refusal."""
    figure, axis = plt.subplots(figsize=(6.8, 4.8))
    for index, table in enumerate(sorted(root.glob("*/lambda-sweep/table.json"))):
        rows = json.loads(table.read_text())["rows"]
        original, swept = rows[0], rows[1:]
        if index == 0:  # the same original in every sweep
            point = (100 * original["over_refusal_rate"], 100 * original["harmful_rate"])
            axis.scatter(*point, marker="*", s=90, color="black", label="original", zorder=3)
        colour = f"C{index}"
        axis.scatter([100 * r["over_refusal_rate"] for r in swept],
                     [100 * r["harmful_rate"] for r in swept],
                     color=colour, s=40, label=table.parent.parent.name)  # fmt: skip
        for row in swept:
            label = f"λ {row['lambda']:g}" + (f", c {row['contrast']:g}" if row["contrast"] else "")
            point = (100 * row["over_refusal_rate"], 100 * row["harmful_rate"])
            axis.annotate(label, point, textcoords="offset points", xytext=(5, 3), fontsize=7,
                          color=colour)  # fmt: skip
    axis.set_xlabel("over-refusal on harmless validation prompts (%)")
    axis.set_ylabel("harmful rate on validation prompts, rules judge (%)")
    axis.set_title("SKU's λ × c sweeps on the validation split: harm against over-refusal")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(root: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    folders = sorted((root / "eval").iterdir(), key=lambda p: (p.name != "original", p.name))
    original = _row(folders[0], None) if folders and folders[0].name == "original" else None
    rows = [_row(folder, original) for folder in folders if (folder / "results.json").is_file()]
    lines = ["# Study results (generated by docs/study/report.py)", "",
             "## Test split", "", *_table(rows), "", "## λ sweeps on the validation split", "",
             *_sweeps(root), *_lambda_grid(root)]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    _plot(rows, out / "harm_vs_utility.png")
    _plot_sweep_tradeoff(root, out / "sweep_tradeoff.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
