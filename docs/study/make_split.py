"""The split of the efficacy study (docs/study.md), from the development copies of BeaverTails
(prompt/safe/unsafe JSONL, the stand-in for PKU-SafeRLHF) and TruthfulQA (CSV) in
../shared/data. Each is shuffled with seed 0; the first rows are the test split (final numbers
only), the next the validation split (choosing settings and λ), the rest is for training:

    harmful_test.jsonl 200, harmful_val.jsonl 100, harmful_train.jsonl 4216   (BeaverTails)
    normal_test.csv 120, normal_val.csv 80, normal_train.csv 617              (TruthfulQA)

Development only: sku-fast never needs these files.

    python docs/study/make_split.py [OUT_DIR]    # default runs/study/data
"""

import csv
import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
HARMFUL = {"test": 200, "val": 100}
NORMAL = {"test": 120, "val": 80}


def _parts(rows: list, sizes: dict[str, int]) -> dict[str, list]:
    parts, start = {}, 0
    for name, size in sizes.items():
        parts[name] = rows[start : start + size]
        start += size
    parts["train"] = rows[start:]
    return parts


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = (DATA / "beavertails_spard" / "beaverTails_train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    random.Random(0).shuffle(rows)
    for name, part in _parts(rows, HARMFUL).items():
        text = "".join(json.dumps(r) + "\n" for r in part)
        (out / f"harmful_{name}.jsonl").write_text(text)

    with open(DATA / "truthfulqa" / "TruthfulQA.csv", newline="") as source:
        reader = csv.DictReader(source)
        fields, normal = reader.fieldnames, list(reader)
    random.Random(0).shuffle(normal)
    for name, part in _parts(normal, NORMAL).items():
        with open(out / f"normal_{name}.csv", "w", newline="") as target:
            writer = csv.DictWriter(target, fieldnames=fields)
            writer.writeheader()
            writer.writerows(part)
    print(json.dumps({p.name: sum(1 for _ in p.open()) for p in sorted(out.iterdir())}))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study/data"))
