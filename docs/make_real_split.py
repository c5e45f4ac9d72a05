"""Write the train/eval split used for the real-data comparison in the README.

Reads the development copies of BeaverTails (prompt/unsafe JSONL) and TruthfulQA (CSV) from
../shared/data, shuffles each with seed 0 and writes, into the folder given (default runs/real):
harmful_eval.jsonl (40) and harmful_train.jsonl (400) from BeaverTails, normal_eval.csv (40)
and normal_train.csv (the other 777) from TruthfulQA. Development only: sku-fast never needs
these files.

    python docs/make_real_split.py [OUT_DIR]
"""

import csv
import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EVAL_ROWS, HARMFUL_TRAIN_ROWS = 40, 400


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    harmful = (DATA / "beavertails_spard" / "beaverTails_train.jsonl").read_text().splitlines()
    random.Random(0).shuffle(harmful)
    (out / "harmful_eval.jsonl").write_text("\n".join(harmful[:EVAL_ROWS]) + "\n")
    train = harmful[EVAL_ROWS : EVAL_ROWS + HARMFUL_TRAIN_ROWS]
    (out / "harmful_train.jsonl").write_text("\n".join(train) + "\n")

    with open(DATA / "truthfulqa" / "TruthfulQA.csv", newline="") as source:
        reader = csv.DictReader(source)
        fields, rows = reader.fieldnames, list(reader)
    random.Random(0).shuffle(rows)
    for name, part in (
        ("normal_eval.csv", rows[:EVAL_ROWS]),
        ("normal_train.csv", rows[EVAL_ROWS:]),
    ):
        with open(out / name, "w", newline="") as target:
            writer = csv.DictWriter(target, fieldnames=fields)
            writer.writeheader()
            writer.writerows(part)
    print(json.dumps({path.name: path.stat().st_size for path in sorted(out.iterdir())}))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/real"))
