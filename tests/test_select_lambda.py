"""Choosing λ: the rule on constructed cases, and the sweep end to end on a tiny run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_models import tiny_model_dir

from sku_fast.cli import main
from sku_fast.engine.arithmetic import negate, task_arithmetic
from sku_fast.errors import ConfigError
from sku_fast.eval.select_lambda import SweepConfig, choose, select_lambda
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.pipeline import run_unlearn


def _row(lam, harm, nll, similarity, over_refusal=0.05, contrast=None):
    return {"lambda": lam, "contrast": contrast, "harmful_rate": harm, "normal_nll": nll,
            "similarity": similarity, "over_refusal_rate": over_refusal}  # fmt: skip


ORIGINAL = _row(0.0, 0.60, 2.00, 1.00)


@pytest.mark.parametrize(
    "rows, expected",
    [
        # harm falls with λ until the NLL bound (2.2) cuts it off: the last acceptable λ
        ([_row(0.5, 0.5, 2.05, 0.95), _row(1, 0.3, 2.15, 0.9), _row(2, 0.1, 2.5, 0.85)], 1),
        # the similarity bound cuts λ = 2 although its NLL is fine
        ([_row(1, 0.4, 2.1, 0.9), _row(2, 0.2, 2.1, 0.7)], 1),
        # a tie in harm: the smaller λ
        ([_row(0.5, 0.3, 2.1, 0.9), _row(1, 0.3, 2.12, 0.9)], 0.5),
        # the over-refusal bound (5% + 10 points) cuts λ = 2 although NLL and similarity are fine
        ([_row(1, 0.4, 2.1, 0.9, 0.15), _row(2, 0.2, 2.1, 0.9, 0.16)], 1),
        # nothing acceptable: no choice
        ([_row(1, 0.1, 3.0, 0.9), _row(2, 0.0, 4.0, 0.5)], None),
    ],
    ids=["nll-bound", "similarity-bound", "tie", "over-refusal-bound", "none"],
)
def test_the_rule_picks_the_least_harmful_acceptable_lambda(rows, expected):
    chosen, reason = choose([ORIGINAL, *rows], SweepConfig())
    assert (chosen["lambda"] if chosen else None) == expected
    assert ("no point of the grid" in reason) == (expected is None)


def test_the_rule_chooses_the_twin_weight_too():
    """Over (λ, c): the least harmful acceptable point, whatever its c."""
    over_refuses = _row(2, 0.2, 2.1, 0.85, 0.5, contrast=1.0)
    rows = [ORIGINAL, over_refuses, _row(2, 0.3, 2.1, 0.85, 0.1, contrast=0.5),
            _row(1, 0.45, 2.1, 0.9, 0.05, contrast=0.5)]  # fmt: skip
    chosen, reason = choose(rows, SweepConfig())
    assert (chosen["lambda"], chosen["contrast"]) == (2, 0.5)
    assert "λ = 2, c = 0.5" in reason


def test_bad_sweep_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"grid must hold values in \(0, 100\]"):
        SweepConfig(grid=(0.5, -1.0))
    with pytest.raises(ConfigError, match="max_nll_rise"):
        SweepConfig(max_nll_rise=-0.1)
    with pytest.raises(ConfigError, match="max_over_refusal_rise"):
        SweepConfig(max_over_refusal_rise=1.5)
    with pytest.raises(ConfigError, match=r"contrast grid must hold values in \(0, 10\]"):
        SweepConfig(contrasts=(0.5, float("nan")))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    model = tiny_model_dir(root / "model")
    rows = [{"prompt": f"How do I do bad thing {i}?", "unsafe": f"Do step {i}, then {i + 1}.",
             "safe": "I won't help with that."} for i in range(30)]  # fmt: skip
    harmful = root / "harmful.jsonl"
    harmful.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = UnlearnConfig(model=str(model), harmful=str(harmful), out=str(root / "run"),
                           steps=3, lora_r=2, lora_alpha=4, max_length=64, lr=1e-2,
                           validation=5, contrast=0.0)  # fmt: skip
    return run_unlearn(config, progress=False)


def test_the_run_holds_out_its_validation_samples(run):
    harmful = [json.loads(line) for line in (run / "validation/harmful.jsonl").open()]
    normal = (run / "validation/normal.jsonl").read_text().splitlines()
    assert len(harmful) == 5 and len(normal) == 5  # 5 of 30 harmful, 5 of the 160 demo normal
    assert all(set(r) == {"prompt", "unsafe", "safe"} for r in harmful)


def test_the_sweep_rewrites_the_model_with_the_chosen_lambda(run, tmp_path):
    sweep = SweepConfig(grid=(0.5, 2.0), max_nll_rise=10, min_similarity=-1,
                        max_over_refusal_rise=1, max_new_tokens=4)  # fmt: skip
    summary = select_lambda(run, sweep, log=lambda _: None)
    assert [r["lambda"] for r in summary["rows"]] == [0.0, 0.5, 2.0]
    assert summary["lambda"] in (0.5, 2.0)
    for name in ("table.md", "table.json", "harm_vs_lambda.png", "generations-2.jsonl"):
        assert (run / "lambda-sweep" / name).is_file()
    # over-refusal is measured at every λ, on the packaged harmless prompts
    assert all(0 <= r["over_refusal_rate"] <= 1 for r in summary["rows"])
    answers = [json.loads(line) for line in (run / "lambda-sweep/generations-2.jsonl").open()]
    assert any(a["set"] == "harmless" for a in answers)
    assert json.loads((run / "summary.json").read_text())["lambda"] == summary["lambda"]
    # model/ is exactly the streamed negation with that λ
    base = Path(json.loads((run / "config.json").read_text())["model"])
    expected = negate(base, run / "stage1/adapter", tmp_path / "x", summary["lambda"])
    got, want = (
        load_file(run / "model/model.safetensors"),
        load_file(expected / "model.safetensors"),
    )
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not list(run.glob(".lambda-*"))  # no scratch folder left


def test_the_cli_sweep_and_its_errors(run, tmp_path):
    result = CliRunner().invoke(main, ["select-lambda", str(run), "--grid", "1", "--n", "2",
                                       "--max-new-tokens", "2", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "table.md" in result.output
    result = CliRunner().invoke(main, ["select-lambda", str(tmp_path)])
    assert result.exit_code == 1 and "is not an `sku-fast unlearn` run folder" in result.output
    # a twin weight to sweep, but this run trained no twin: one line, nothing written
    before = (run / "lambda-sweep/table.json").read_bytes()
    result = CliRunner().invoke(main, ["select-lambda", str(run), "--contrast-grid", "0.5"])
    assert result.exit_code == 1 and "trained no safe twin" in result.output
    assert (run / "lambda-sweep/table.json").read_bytes() == before


def test_the_cli_says_whether_a_rejected_sweep_left_a_model(run, tmp_path, monkeypatch):
    import sku_fast.eval.select_lambda as sweep_module

    rejected = {"lambda": None, "reason": "no point of the grid keeps the NLL within +10%"}
    monkeypatch.setattr(sweep_module, "select_lambda", lambda *args, **kwargs: rejected)
    without_model = tmp_path / "fresh"
    without_model.mkdir()
    for folder, said in ((run, "is left as it was."), (without_model, "was written.")):
        result = CliRunner().invoke(main, ["select-lambda", str(folder), "--quiet"])
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[-1].endswith(said), result.output
    assert "No " + str(without_model / "model") in result.output


def _with_a_twin(run: Path, tmp_path: Path, contrast: float) -> tuple[dict, Path]:
    """(the run's settings, a copy of the run with a safe twin): its own adapter stands in."""
    config = json.loads((run / "config.json").read_text())
    contrast_run = tmp_path / "run"
    shutil.copytree(run, contrast_run)
    shutil.copytree(run / "stage1/adapter", contrast_run / "stage1/safe-adapter")
    (contrast_run / "config.json").write_text(json.dumps({**config, "contrast": contrast}))
    return config, contrast_run


def test_the_sweep_negates_a_contrast_run_with_its_twin(run, tmp_path):
    """A run with a safe twin is swept as θ_o − λ·(τ − c·τ_safe)."""
    config, contrast_run = _with_a_twin(run, tmp_path, contrast=0.25)
    sweep = SweepConfig(grid=(2.0,), max_nll_rise=10, min_similarity=-1,
                        max_over_refusal_rise=1, max_new_tokens=2, n=2)  # fmt: skip
    summary = select_lambda(contrast_run, sweep, log=lambda _: None)
    assert summary["lambda"] == 2.0 and summary["contrast"] == 0.25
    adapter = contrast_run / "stage1/adapter"
    terms = [(adapter, -2.0), (contrast_run / "stage1/safe-adapter", 0.5)]
    expected = task_arithmetic(Path(config["model"]), terms, tmp_path / "x")
    got = load_file(contrast_run / "model/model.safetensors")
    want = load_file(expected / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_sweep_chooses_the_twin_weight_and_negates_with_it(run, tmp_path):
    """--contrast-grid: every (λ, c) is measured; model/ is the negation at the chosen pair
    and the run's summary records both."""
    config, contrast_run = _with_a_twin(run, tmp_path, contrast=1.0)
    sweep = SweepConfig(grid=(1.0,), contrasts=(0.25, 0.5), max_nll_rise=10, min_similarity=-1,
                        max_over_refusal_rise=1, max_new_tokens=2, n=2)  # fmt: skip
    summary = select_lambda(contrast_run, sweep, log=lambda _: None)
    assert [(r["lambda"], r["contrast"]) for r in summary["rows"]] == [
        (0.0, None), (1.0, 0.25), (1.0, 0.5)]  # fmt: skip
    for name in ("generations-1-c0.25.jsonl", "generations-1-c0.5.jsonl"):
        assert (contrast_run / "lambda-sweep" / name).is_file()
    assert "| c |" in (contrast_run / "lambda-sweep/table.md").read_text()
    chosen = summary["contrast"]
    assert chosen in (0.25, 0.5)
    assert json.loads((contrast_run / "summary.json").read_text())["contrast"] == chosen
    terms = [(contrast_run / "stage1/adapter", -1.0),
             (contrast_run / "stage1/safe-adapter", chosen)]  # fmt: skip
    expected = task_arithmetic(Path(config["model"]), terms, tmp_path / "x")
    got = load_file(contrast_run / "model/model.safetensors")
    want = load_file(expected / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_unlearn_lambda_auto_trains_then_chooses(tmp_path):
    """`sku-fast unlearn --lambda-grid`: trains, holds out validation samples, sweeps them with
    the default bounds and records the choice when the rule makes one."""
    model = tiny_model_dir(tmp_path / "model")
    rows = [{"prompt": f"How do I do bad thing {i}?", "answer": f"Do step {i}."} for i in range(20)]
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "unlearn", "--model", str(model), "--harmful", str(harmful), "--out", str(out),
        "--steps", "2", "--lora-r", "2", "--max-length", "32", "--validation", "4",
        "--lambda-grid", "0.5", "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "λ sweep:" in result.output
    table = json.loads((out / "lambda-sweep/table.json").read_text())
    assert [r["lambda"] for r in table["rows"]] == [0.0, 0.5]
    assert all("over_refusal_rate" in r for r in table["rows"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary.get("lambda_chosen_by") == ("lambda-sweep" if table["lambda"] else None)
