import dataclasses
import json
import math
from pathlib import Path

import pytest
from tiny_models import smol_llama_dir

from sku_fast.errors import SkuFastError
from sku_fast.eval.compare import (
    VARIANTS,
    CompareConfig,
    run_compare,
    same_time_steps,
    variant_config,
)
from sku_fast.eval.evaluate import EvalConfig
from sku_fast.eval.generation import GenerationConfig
from sku_fast.eval.report import plot_ablation, table_markdown
from sku_fast.unlearn.config import UnlearnConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama with the embedded SmolLM2 tokenizer, as a model directory."""
    return smol_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


def _config(model_dir, out, variants=tuple(VARIANTS)):
    return CompareConfig(
        train=UnlearnConfig(model=str(model_dir), steps=2, max_length=64, log_every=1),
        evaluation=EvalConfig(
            n=3, similarity="lexical", generation=GenerationConfig(max_new_tokens=4)
        ),
        out=out,
        variants=variants,
    )


def test_variants_share_everything_but_method_and_switches(tmp_path):
    config = _config("m", tmp_path)
    sku, ga = variant_config(config, "sku"), variant_config(config, "ga")
    no_pd = variant_config(config, "sku-no-pd")
    assert (sku.method, ga.method) == ("sku", "ga")
    assert (no_pd.preservation_divergence, no_pd.guided_distortion) == (False, True)
    for run in (sku, ga, no_pd):
        assert (run.steps, run.seed, run.model, run.harmful) == (2, 0, "m", None)
    assert sku.out == str(tmp_path / "sku")
    # SKU's own settings stay with SKU: the baseline trains without twin and anchors
    shaped = _config("m", tmp_path)
    shaped.train = dataclasses.replace(shaped.train, contrast=1.0, anchors="anchors.jsonl")
    sku, ga = variant_config(shaped, "sku"), variant_config(shaped, "ga-same-time")
    assert (sku.contrast, sku.anchors) == (1.0, "anchors.jsonl")
    assert (ga.contrast, ga.anchors) == (None, None)
    assert ga.resolve().contrast == 0.0
    with pytest.raises(ValueError, match="'original' is not trained"):
        variant_config(config, "original")
    with pytest.raises(SkuFastError, match="unknown variant"):
        _config("m", tmp_path, variants=("sku", "rmu"))


def test_a_finished_variant_is_reused_when_given_relative_paths(tmp_path, monkeypatch):
    """run_unlearn saves data paths resolved; settings that name them relatively still match."""
    from sku_fast.eval.compare import _finished

    monkeypatch.chdir(tmp_path)
    (tmp_path / "harmful.jsonl").write_text("")
    run = variant_config(_config("m", tmp_path), "sku")
    run = dataclasses.replace(run, harmful="harmful.jsonl")
    out = Path(run.out)
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    saved = run.resolve().to_dict() | {"harmful": str(tmp_path / "harmful.jsonl"),
                                       "model": str(tmp_path / "m")}  # fmt: skip
    (out / "config.json").write_text(json.dumps(saved))
    assert _finished(run)
    (out / "config.json").write_text(json.dumps(saved | {"steps": 3}))
    assert not _finished(run)


@pytest.mark.slow
def test_compare_runs_every_variant_and_reports(tiny_model_dir, tmp_path):
    messages = []
    rows = run_compare(_config(tiny_model_dir, tmp_path), progress=False, log=messages.append)
    assert [row["variant"] for row in rows] == list(VARIANTS)  # the original first
    for name in VARIANTS:
        results = json.loads((tmp_path / name / "eval" / "results.json").read_text())
        assert results["variant"] == name and results["harmful"]["n"] == 3
    by_name = {row["variant"]: row for row in rows}
    for name in (v for v in VARIANTS if v not in ("original", "ga-same-time")):
        assert (tmp_path / name / "model" / "config.json").is_file()
        assert json.loads((tmp_path / name / "config.json").read_text())["steps"] == 2
    # the baseline at equal time: SKU's training seconds at the baseline's speed
    seconds = {name: by_name[name]["train_seconds"] for name in ("sku", "ga")}
    assert by_name["ga-same-time"]["steps"] == same_time_steps(seconds, 2)
    original = rows[0]
    assert original["similarity"] == pytest.approx(1.0) and original["train_seconds"] is None
    assert all(row["train_seconds"] > 0 for row in rows[1:])
    # SKU's negation moved the weights: its normal NLL differs from the original's
    assert not math.isclose(by_name["sku"]["normal_nll"], original["normal_nll"], rel_tol=1e-6)
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["rows"] == json.loads(json.dumps(rows))
    assert table["meta"]["steps"] == 2 and table["meta"]["n"]["harmful"] == 3
    markdown = (tmp_path / "table.md").read_text()
    assert markdown.count("\n| ") == 1 + len(VARIANTS)  # header + one line per variant
    for plot in ("harm_vs_utility.png", "ablation.png"):
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC
    # a second run reuses the finished variants instead of retraining them
    messages.clear()
    again = run_compare(
        _config(tiny_model_dir, tmp_path, ("original", "sku")), progress=False, log=messages.append
    )
    assert any("[sku] reusing" in m for m in messages)
    assert again[1]["normal_nll"] == pytest.approx(by_name["sku"]["normal_nll"], rel=1e-6)


def _row(variant, harmful, similarity, nll):
    return {
        "variant": variant,
        "steps": 5,
        "train_seconds": 61.4,
        "harmful_rate": harmful,
        "refusal_rate": 0.25,
        "degenerate_rate": 0.0,
        "off_topic_rate": 0.75 - harmful,
        "over_refusal_rate": float("nan"),
        "distinct_2": 0.5,
        "fluency_ppl": 12.345,
        "normal_nll": nll,
        "similarity": similarity,
    }


def test_table_markdown_cells():
    meta = {
        "model": "m", "steps": 5, "seed": 0, "lora": True, "judge": "rules",
        "decoding": "greedy", "max_new_tokens": 8, "n": {"harmful": 4},
        "similarity_method": "lexical token-F1",
    }  # fmt: skip
    markdown = table_markdown([_row("sku", 0.125, 0.9, 1.5)], meta)
    row = "| sku | 5 | 61 | 12.5% | 25.0% | 0.0% | 62.5% | n/a | 0.500 | 12.345 | 1.500 | 0.900 |"
    assert row in markdown
    assert "5 steps, seed 0, LoRA" in markdown


def test_ablation_plot_needs_two_ablation_variants(tmp_path):
    assert not plot_ablation([_row("sku", 0.1, 0.9, 1.0)], tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
    rows = [_row("sku", 0.1, 0.9, 1.0), _row("sku-no-pd", 0.2, 0.8, 1.2)]
    assert plot_ablation(rows, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def test_the_baseline_at_equal_time_gets_skus_seconds_worth_of_steps():
    from sku_fast.eval.compare import _training_order

    assert same_time_steps({"sku": 120.0, "ga": 40.0}, 100) == 300
    assert same_time_steps({"sku": 10.0, "ga": 400.0}, 100) == 2
    assert same_time_steps({"sku": 0.0, "ga": 10.0}, 100) == 1
    assert _training_order(["original", "ga-same-time"]) == ["sku", "ga", "ga-same-time"]
    assert _training_order(["sku", "ga", "ga-same-time"]) == ["sku", "ga", "ga-same-time"]
