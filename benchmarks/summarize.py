"""Markdown tables from the pytest-benchmark JSON files in a folder (the GPU check's output):
one table per benchmark group, each row a variant with its best and mean time and the extra
figures it recorded (GB/s, peak memory), and the speed-up over the group's eager baseline.

    python benchmarks/summarize.py gpu-check/ > gpu-check/summary.md
"""

import json
import sys
from pathlib import Path

BASELINES = ("eager", "eager-linear", "torch")


def _variant(bench: dict) -> str:
    params = bench.get("params") or {}
    return str(params.get("variant") or params.get("backend") or bench["name"])


def tables(folder: Path) -> str:
    lines = []
    device = (
        (folder / "device.txt").read_text().strip() if (folder / "device.txt").is_file() else "?"
    )
    lines.append(f"Device: {device}\n")
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        groups: dict[str, list[dict]] = {}
        for bench in data.get("benchmarks", []):
            groups.setdefault(bench["group"] or bench["name"], []).append(bench)
        for group, benches in groups.items():
            base = next((b for b in benches if _variant(b) in BASELINES), None)
            lines += [
                f"### {group}",
                "",
                "| variant | best s | mean s | vs baseline | GB/s | peak MB |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for bench in benches:
                stats, extra = bench["stats"], bench.get("extra_info", {})
                speed = f"{base['stats']['min'] / stats['min']:.2f}x" if base else ""
                gbps = f"{extra['gbps']:.0f}" if "gbps" in extra else ""
                peak = extra.get("peak_extra_mb", extra.get("peak_step_mb"))
                peak = f"{peak:.0f}" if isinstance(peak, (int, float)) else ""
                lines.append(f"| {_variant(bench)} | {stats['min']:.4f} | {stats['mean']:.4f} | "
                             f"{speed} | {gbps} | {peak} |")  # fmt: skip
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check")))
