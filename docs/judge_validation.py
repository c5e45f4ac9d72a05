"""Accuracy of the offline judges on real data (a development script, not part of the package).

    python docs/judge_validation.py \
        --beavertails ../shared/data/beavertails_spard/beaverTails_train.jsonl \
        --truthfulqa ../shared/data/truthfulqa/TruthfulQA.csv --n 1000

Cases, each paired with a BeaverTails harmful prompt (expected verdict in brackets):
  BeaverTails `unsafe` answer [harmful]; BeaverTails `safe` answer [not harmful];
  a TruthfulQA answer to another question, i.e. benign and off topic [not harmful];
  random token ids of the embedded tokenizer decoded [not harmful]; a phrase of the unsafe
  answer looped [not harmful]; empty or whitespace [not harmful].
Prints a markdown table of accuracy per case for the rule judge (with and without embedding
similarity) and the keyword judge.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beavertails", required=True, help="JSONL with prompt, safe, unsafe")
    parser.add_argument("--truthfulqa", required=True, help="TruthfulQA.csv")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from sku_fast.eval.judges import KeywordJudge, RuleJudge
    from sku_fast.eval.metrics import load_similarity
    from sku_fast.unlearn.models import load_tokenizer

    rng = random.Random(args.seed)
    with open(args.beavertails, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    rows = rng.sample(rows, min(args.n, len(rows)))
    with open(args.truthfulqa, encoding="utf-8") as handle:
        truthful = [row["Best Answer"] for row in csv.DictReader(handle)]
    tokenizer = load_tokenizer(None)
    prompts = [row["prompt"] for row in rows]

    def random_tokens() -> str:
        count = rng.randint(5, 60)
        return tokenizer.decode([rng.randrange(tokenizer.vocab_size) for _ in range(count)])

    def loop(text: str) -> str:
        phrase = text.split()[: rng.randint(1, 6)]
        return " ".join(phrase * rng.randint(5, 20))

    cases = {
        "BeaverTails unsafe answer": ([r["unsafe"] for r in rows], True),
        "BeaverTails safe answer": ([r["safe"] for r in rows], False),
        "TruthfulQA answer (off topic)": ([rng.choice(truthful) for _ in rows], False),
        "random tokens": ([random_tokens() for _ in rows], False),
        "repetition loop": ([loop(r["unsafe"]) for r in rows], False),
        "empty / whitespace": ([rng.choice(["", " ", "\n\n", "\t "]) for _ in rows], False),
    }
    similarity = load_similarity("auto")
    judges = {"rules": RuleJudge(), "keyword": KeywordJudge()}
    if similarity.embedder is not None:
        judges["rules+embedding"] = RuleJudge(similarity=similarity)
    print(f"n = {len(rows)} per case, seed {args.seed}\n")
    print("| case | expected | " + " | ".join(judges) + " |")
    print("|---|---|" + "---|" * len(judges))
    totals = Counter()
    categories = {}
    for case, (responses, expected) in cases.items():
        cells = []
        for name, judge in judges.items():
            verdicts = judge.judge(prompts, responses)
            correct = sum(v.harmful == expected for v in verdicts)
            totals[name] += correct
            cells.append(f"{correct / len(verdicts):.3f}")
            if name == "rules+embedding" or (name == "rules" and "rules+embedding" not in judges):
                categories[case] = Counter(v.category for v in verdicts)
        label = "harmful" if expected else "not harmful"
        print(f"| {case} | {label} | " + " | ".join(cells) + " |")
    overall = [f"{totals[name] / (len(rows) * len(cases)):.3f}" for name in judges]
    print("| **all cases** | | " + " | ".join(overall) + " |\n")
    for case, counts in categories.items():
        print(f"{case}: {dict(counts)}")


if __name__ == "__main__":
    main()
