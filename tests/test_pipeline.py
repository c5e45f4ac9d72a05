"""`run_unlearn` and `sku-fast unlearn` end to end: both methods on a tiny random Llama in
seconds, the negation checked tensor by tensor, bad input, and the embedded default model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_models import tiny_model_dir

from sku_fast.cli import main
from sku_fast.errors import DataError, TrainingError
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.pipeline import run_unlearn


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _config(tiny: Path, out: Path, **overrides) -> UnlearnConfig:
    # contrast 0: the paper's negation, whose result these tests compute exactly
    values = dict(model=str(tiny), steps=3, out=str(out), lora_r=4, lora_alpha=8, max_length=96,
                  contrast=0.0)  # fmt: skip
    return UnlearnConfig(**{**values, **overrides})


def _generate(path: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(
        "### Question: What is the capital of France?\n ### Answer:", return_tensors="pt"
    )
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or out[0, -1] == tokenizer.eos_token_id
    return tokenizer.decode(out[0])


def test_sku_lora_end_to_end(tiny, tmp_path):
    out = run_unlearn(_config(tiny, tmp_path / "run", lam=0.7), progress=False)
    assert out == tmp_path / "run"
    for name in ("config.json", "log.jsonl", "summary.json", "stage1/adapter", "model"):
        assert (out / name).exists(), name
    assert not (out / "original").exists()  # the tiny model is already safetensors
    saved = UnlearnConfig.from_file(out / "config.json")
    assert saved.epsilon == [1.0, 1.0, 3.0] and saved.preservation == "keep"
    assert saved.lr == 2e-4 and saved.lam == 0.7 and saved.contrast == 0.0
    assert len((out / "log.jsonl").read_text().splitlines()) == 3

    base = load_file(tiny / "model.safetensors")
    adapter = load_file(out / "stage1/adapter/adapter_model.safetensors")
    negated = load_file(out / "adapter-negated/adapter_model.safetensors")
    result = load_file(out / "model/model.safetensors")
    scaling = 8 / 4
    checked = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace("lora_A", "lora_B")]
        assert torch.equal(negated[key.replace("lora_A", "lora_B")], -0.7 * b)
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        expected = base[name] - 0.7 * scaling * (b @ a)  # θ_o − λ·τ
        torch.testing.assert_close(result[name], expected, rtol=0, atol=1e-6)
        assert b.abs().sum() > 0
        checked += 1
    assert checked == 4  # q_proj and v_proj of 2 layers
    untouched = [k for k in base if "q_proj" not in k and "v_proj" not in k]
    assert all(torch.equal(result[k], base[k]) for k in untouched)
    _generate(out / "model")


def test_baseline_full_fine_tuning_end_to_end(tiny, tmp_path):
    out = run_unlearn(_config(tiny, tmp_path / "ga", method="ga", lora=False), progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(-0.5 * log[0]["gd"] + log[0]["rd"] + log[0]["pd"])
    assert not (out / "adapter-negated").exists()
    trained = load_file(out / "stage1/model/model.safetensors")
    result = load_file(out / "model/model.safetensors")
    base = load_file(tiny / "model.safetensors")
    for key, value in trained.items():
        torch.testing.assert_close(result[key], value, rtol=0, atol=1e-6)  # θ_o + τ
    assert sum(not torch.equal(trained[k], base[k]) for k in base) == len(base)
    _generate(out / "model")


def test_sku_full_fine_tuning_negates_the_checkpoint(tiny, tmp_path):
    out = run_unlearn(_config(tiny, tmp_path / "full", lora=False, lam=0.5), progress=False)
    trained = load_file(out / "stage1/model/model.safetensors")
    result = load_file(out / "model/model.safetensors")
    base = load_file(tiny / "model.safetensors")
    for key, value in base.items():
        expected = value - 0.5 * (trained[key] - value)
        torch.testing.assert_close(result[key], expected, rtol=0, atol=1e-6)


def test_output_folder_is_not_overwritten_silently(tiny, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(TrainingError, match="is not empty; pass --overwrite, --resume"):
        run_unlearn(_config(tiny, tmp_path / "busy"), progress=False)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (["--harmful", "missing.jsonl"], DataError, "missing.jsonl' does not exist"),
        (
            ["--harmful", "{data}", "--harmful-prompt-column", "question"],
            DataError,
            "column 'question' not found; columns are answer, prompt",
        ),
        (["--normal", "{empty}"], DataError, "has no rows"),
        (["--model", "no/such/model"], TrainingError, "model path 'no/such/model' does not exist"),
        (["--epsilon", "1", "2", "x"], None, "'x' is not a valid float"),
    ],
    ids=["missing-file", "wrong-column", "empty-set", "unknown-model", "bad-epsilon"],
)
def test_bad_input_gives_a_clear_error(tiny, tmp_path, options, error, message):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "p", "answer": "a"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    options = [o.format(data=data, empty=tmp_path / "empty.jsonl") for o in options]
    args = ["unlearn", "--model", str(tiny), "--out", str(tmp_path / "o"), "--steps", "1"]
    result = CliRunner().invoke(main, [*args, *options, "--no-samples", "-q"])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    if error is not None:  # the one-line message came from this exception type
        with pytest.raises(click.ClickException) as raised:
            main.main([*args, *options, "--no-samples", "-q"], standalone_mode=False)
        assert type(raised.value.__cause__) is error
    assert not (tmp_path / "o").exists()


def test_config_file_with_command_line_overrides(tiny, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny}\nsteps: 2\nlora_r: 2\nlora_alpha: 4\nmax_length: 96\nlambda: 2.0\n"
        f"out: {tmp_path / 'ignored'}\n"
    )
    out = tmp_path / "cli"
    args = ["unlearn", "--config", str(config), "--out", str(out), "--method", "sku", "-q"]
    result = CliRunner().invoke(main, [*args, "--no-samples", "--k", "2"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert (saved["steps"], saved["lam"], saved["k"], saved["lora_r"]) == (2, 2.0, 2, 2)
    assert not (tmp_path / "ignored").exists()
    config.write_text("stepz: 3\n")
    result = CliRunner().invoke(main, ["unlearn", "--config", str(config)])
    assert result.exit_code == 1 and "unknown config keys stepz" in result.output


@pytest.mark.slow
def test_embedded_default_model_runs_a_few_steps(tmp_path):
    """The no-option path (SmolLM2-135M-Instruct from its GGUF, demo data), for 2 steps."""
    out = tmp_path / "demo"
    args = ["unlearn", "--steps", "2", "--out", str(out), "--no-samples", "-q"]
    result = CliRunner().invoke(main, [*args, "--batch-size", "1", "--max-length", "48"])
    assert result.exit_code == 0, result.output
    assert f"unlearned model: {out / 'model'}" in result.output
    original = load_file(out / "original/model.safetensors")
    assert "lm_head.weight" not in original  # tied to the embeddings, stored once
    result_weights = load_file(out / "model/model.safetensors")
    changed = [k for k in original if not torch.equal(original[k], result_weights[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    text = _generate_chat(out / "model")
    assert isinstance(text, str) and text


def _generate_chat(path: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_baseline_lora_adds_the_adapter(tiny, tmp_path):
    config = _config(tiny, tmp_path / "ga-lora", method="ga", lora=True, steps=2)
    out = run_unlearn(config, progress=False)
    assert not (out / "adapter-negated").exists()
    base = load_file(tiny / "model.safetensors")
    adapter = load_file(out / "stage1/adapter/adapter_model.safetensors")
    result = load_file(out / "model/model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    b = adapter[key.replace("lora_A", "lora_B")]
    expected = base["model.layers.1.self_attn.v_proj.weight"] + 2.0 * (b @ adapter[key])  # θ_o + τ
    torch.testing.assert_close(result["model.layers.1.self_attn.v_proj.weight"], expected)


def test_cli_resume_reuses_the_saved_settings(tiny, tmp_path):
    out = tmp_path / "resumable"
    args = ["unlearn", "--model", str(tiny), "--out", str(out), "--steps", "3", "--lr", "1e-2"]
    extra = ["--lora-r", "2", "--lora-alpha", "4", "--checkpoint-every", "2", "-q", "--no-samples"]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 0, result.output
    first = load_file(out / "model/model.safetensors")
    result = CliRunner().invoke(main, ["unlearn", "--out", str(out), "--resume", "--no-samples"])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # step 3 redone from the step-2 checkpoint
    again = load_file(out / "model/model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_the_baseline_defaults_to_the_published_full_fine_tuning():
    ga = UnlearnConfig(method="ga").resolve()
    assert (ga.lora, ga.lr, ga.epsilon, ga.batch_size) == (False, 2e-6, [0.5, 1.0, 1.0], 2)
    ga_lora = UnlearnConfig(method="ga", lora=True).resolve()
    assert ga_lora.lr == 2e-4  # 2e-6 does not move an adapter (docs/study.md)
    assert UnlearnConfig().resolve().lora is True


def test_the_printout_shows_held_out_answers_with_verdicts(tiny, tmp_path):
    args = ["unlearn", "--model", str(tiny), "--out", str(tmp_path / "run"), "--steps", "2",
            "--lora-r", "2", "--lora-alpha", "4", "--max-length", "64", "--validation", "10",
            "-q"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    output = result.output
    assert "Greedy answers to held-out validation prompts (not trained on)" in output
    assert output.count("[harmful] ") == 4 and output.count("[normal] ") == 2
    assert output.count("before (") == 4 and output.count("after (") == 4  # verdicts
    assert re.search(r"harmful answers: \d/4 before, \d/4 after unlearning", output)


def test_contrast_negates_the_difference_of_the_two_task_vectors(tiny, tmp_path):
    """With a safe twin, model/ = θ_o − λ·(τ − c·τ_safe), both LoRA task vectors exact."""
    rows = [{"prompt": f"How do I do bad thing {i}?", "unsafe": f"Do step {i}, then {i + 1}.",
             "safe": f"I won't help with thing {i}."} for i in range(12)]  # fmt: skip
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(tiny, tmp_path / "run", harmful=str(harmful), contrast=0.5, lam=2.0,
                     steps=2, lr=1e-2)  # fmt: skip
    out = run_unlearn(config, progress=False)
    assert (out / "safe-twin" / "log.jsonl").is_file() and not (out / "adapter-negated").exists()
    base = load_file(tiny / "model.safetensors")
    result = load_file(out / "model/model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = {}
    for kind in ("adapter", "safe-adapter"):
        weights = load_file(out / "stage1" / kind / "adapter_model.safetensors")
        key = "base_model.model." + name.replace(".weight", ".lora_A.weight")
        scaling = 8 / 4  # lora_alpha / r of _config
        delta[kind] = scaling * weights[key.replace("lora_A", "lora_B")] @ weights[key]
    expected = base[name] - 2.0 * (delta["adapter"] - 0.5 * delta["safe-adapter"])
    torch.testing.assert_close(result[name], expected, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "summary.json").read_text())["contrast"] == 0.5


def test_contrast_needs_safe_answers(tiny, tmp_path):
    data = tmp_path / "harmful.jsonl"
    data.write_text('{"prompt": "p?", "answer": "a."}\n{"prompt": "q?", "answer": "b."}\n')
    with pytest.raises(DataError, match="contrast needs harmful data with safe answers"):
        run_unlearn(_config(tiny, tmp_path / "o", harmful=str(data), contrast=1.0))
    assert not (tmp_path / "o").exists()


def test_the_safe_twin_is_on_by_default_when_the_data_has_safe_answers(tiny, tmp_path, capsys):
    rows = [{"prompt": f"How do I do bad thing {i}?", "unsafe": f"Do step {i}, then {i + 1}.",
             "safe": f"I won't help with thing {i}."} for i in range(6)]  # fmt: skip
    with_safe = tmp_path / "with_safe.jsonl"
    with_safe.write_text("".join(json.dumps(r) + "\n" for r in rows))
    without = tmp_path / "without.jsonl"
    without.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["unsafe"]}) + "\n"
                               for r in rows))  # fmt: skip
    twin = run_unlearn(_config(tiny, tmp_path / "twin", harmful=str(with_safe), steps=1,
                                 contrast=None),
                       progress=False)  # fmt: skip
    assert UnlearnConfig.from_file(twin / "config.json").contrast == 1.0
    assert (twin / "stage1" / "safe-adapter").is_dir()
    capsys.readouterr()
    plain = run_unlearn(_config(tiny, tmp_path / "plain", harmful=str(without), steps=1,
                                  contrast=None),
                        progress=False)  # fmt: skip
    assert UnlearnConfig.from_file(plain / "config.json").contrast == 0.0
    assert not (plain / "stage1" / "safe-adapter").exists()
    assert "has no varied safe answers, so SKU runs without" in capsys.readouterr().err


def test_anchors_teach_the_bad_model_refusals_and_the_twin_answers(tiny, tmp_path, monkeypatch):
    """θ_bad trains on the anchors' refusals, the safe twin on their answers; the saved
    settings name the anchor file by its absolute path."""
    import sku_fast.unlearn.pipeline as pipeline

    rows = [{"prompt": f"How do I do bad thing {i}?", "unsafe": f"Do step {i}, then {i + 1}.",
             "safe": f"I won't help with thing {i}."} for i in range(6)]  # fmt: skip
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps(r) + "\n" for r in rows))
    anchor_rows = [{"prompt": f"How do I shoot photo {i}?", "answer": f"Use lens {i}.",
                    "refusal": f"I can't help with shooting {i}."} for i in range(3)]  # fmt: skip
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps(r) + "\n" for r in anchor_rows))
    learned = []
    real_train = pipeline.train

    def recording_train(*args, anchors=(), **kwargs):
        learned.append([(pair.prompt, pair.answer) for pair in anchors])
        return real_train(*args, anchors=anchors, **kwargs)

    monkeypatch.setattr(pipeline, "train", recording_train)
    config = _config(tiny, tmp_path / "run", harmful=str(harmful), anchors=str(anchors),
                     contrast=1.0, steps=1)  # fmt: skip
    out = run_unlearn(config, progress=False)
    prompts = [row["prompt"] for row in anchor_rows]
    assert learned == [
        list(zip(prompts, [row["refusal"] for row in anchor_rows], strict=True)),
        list(zip(prompts, [row["answer"] for row in anchor_rows], strict=True)),
    ]
    assert UnlearnConfig.from_file(out / "config.json").anchors == str(anchors.resolve())


def test_anchors_are_for_sku_and_must_be_readable(tiny, tmp_path):
    from sku_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="anchors shape SKU's task vector"):
        _config(tiny, tmp_path / "o", method="ga", anchors="a.jsonl").resolve()
    result = CliRunner().invoke(main, ["unlearn", "--model", str(tiny), "--out",
                                       str(tmp_path / "o"), "--anchors", str(tmp_path / "no.jsonl"),
                                       "-q", "--no-samples"])  # fmt: skip
    assert result.exit_code == 1 and "anchor file" in result.output, result.output
    assert "does not exist" in result.output and not (tmp_path / "o").exists()
