"""The run folder of `sku-fast unlearn` never costs the user a file: it may not be, contain or
lie inside an input; a new run appears only when complete and replaces an earlier one only
then; checkpoints are safe to open and resume exactly, refusing anything that does not belong
to the run. Each case here reproduces a failure found by adversarial testing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model_dir

from sku_fast.cli import main
from sku_fast.errors import TrainingError
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.pipeline import run_unlearn

TINY = dict(steps=3, lora_r=2, lora_alpha=4, max_length=64, lr=1e-2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _digest(root: Path) -> dict[str, str]:
    """Every file under root with the hash of its bytes: equal means untouched."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _data(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    harmful, normal = folder / "harmful.jsonl", folder / "normal.jsonl"
    rows = [{"prompt": f"How do I do bad thing {i}?", "answer": f"Do step {i} then step {i + 1}."}
            for i in range(6)]  # fmt: skip
    harmful.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sums = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(6)]
    normal.write_text("".join(json.dumps(r) + "\n" for r in sums))
    return harmful, normal


def _unlearn(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["unlearn", *map(str, args), "-q", "--no-samples"])
    return result.exit_code, result.output


def _tiny_args(tiny: Path) -> list[str]:
    return ["--model", tiny, "--steps", 1, "--lora-r", 2, "--lora-alpha", 4, "--max-length", 64]


@pytest.mark.parametrize("where", ["the-model", "parent-of-model", "inside-model", "data-folder"])
def test_overwrite_never_deletes_an_input(tiny, tmp_path, where):
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny, model)
    harmful, normal = _data(tmp_path / "data")
    out = {
        "the-model": model,
        "parent-of-model": tmp_path / "models",
        "inside-model": model / "run",
        "data-folder": tmp_path / "data",
    }[where]
    before = _digest(tmp_path)
    code, output = _unlearn(*_tiny_args(model), "--harmful", harmful, "--normal", normal,
                            "--out", out, "--overwrite")  # fmt: skip
    assert code == 1
    assert output.startswith("Error: output ") and output.count("\n") == 1
    assert _digest(tmp_path) == before


def test_a_settings_file_is_an_input_too(tiny, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    settings = tmp_path / "run" / "settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"model": str(model), **TINY}))
    before = _digest(tmp_path)
    # into the model folder with --resume (this overwrote the model's config.json)
    code, output = _unlearn("--config", settings, "--out", model, "--resume")
    assert code == 1 and "Error: output" in output
    # into the folder that holds the settings file
    code, output = _unlearn("--config", settings, "--out", settings.parent, "--overwrite")
    assert code == 1 and "contains the input" in output
    assert _digest(tmp_path) == before


def test_a_failed_overwrite_keeps_the_earlier_run(tiny, tmp_path):
    out = tmp_path / "run"
    run_unlearn(UnlearnConfig(model=str(tiny), out=str(out), **TINY), progress=False)
    before = _digest(out)

    def stop(step, record):
        if step == 2:
            raise KeyboardInterrupt

    config = UnlearnConfig(model=str(tiny), out=str(out), overwrite=True, **TINY)
    with pytest.raises(KeyboardInterrupt):
        run_unlearn(config, progress=False, on_step=stop)
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary left


def test_a_run_that_fails_before_training_leaves_nothing(tmp_path, tiny):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "x"}\n')
    code, output = _unlearn(*_tiny_args(tiny), "--harmful", bad, "--out", tmp_path / "a" / "run")
    assert code == 1 and "cannot tell the prompt and answer columns apart" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_same_weights(tiny, tmp_path):
    whole = run_unlearn(
        UnlearnConfig(model=str(tiny), out=str(tmp_path / "whole"), **{**TINY, "steps": 4}),
        progress=False,
    )

    def kill(step, record):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    config = UnlearnConfig(
        model=str(tiny), out=str(out), checkpoint_every=2, **{**TINY, "steps": 4}
    )
    with pytest.raises(KeyboardInterrupt):
        run_unlearn(config, progress=False, on_step=kill)
    assert (out / "checkpoints" / "step-0000002").is_dir() and not (out / "model").exists()
    # resumed from another folder name and with the model given by a relative path
    moved = tmp_path / "moved"
    out.rename(moved)
    cwd = os.getcwd()
    try:
        os.chdir(tiny.parent)
        resumed = UnlearnConfig(model=tiny.name, out=str(moved), resume=True, checkpoint_every=2,
                                **{**TINY, "steps": 4})  # fmt: skip
        run_unlearn(resumed, progress=False)
    finally:
        os.chdir(cwd)
    a, b = (
        load_file(whole / "model/model.safetensors"),
        load_file(moved / "model/model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def checkpointed(tiny, tmp_path) -> Path:
    """A finished run with a checkpoint at step 2 of 3."""
    out = tmp_path / "run"
    config = UnlearnConfig(model=str(tiny), out=str(out), checkpoint_every=2, **TINY)
    run_unlearn(config, progress=False)
    return out


def _resume(out: Path) -> tuple[int, str]:
    return _unlearn("--out", out, "--resume")


def test_resume_never_unpickles(checkpointed, tmp_path):
    """A state.pt whose pickle runs a command (the old format) is never opened."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    step = checkpointed / "checkpoints" / "step-0000002"
    torch.save({"optimizer": Payload()}, step / "state.pt")
    (step / "optimizer.safetensors").unlink()
    config = (checkpointed / "config.json").read_bytes()
    code, output = _resume(checkpointed)
    assert code == 1 and "optimizer.safetensors: missing" in output
    assert not marker.exists()
    assert (checkpointed / "config.json").read_bytes() == config


def _damage(step: Path, how: str) -> None:
    if how == "broadcastable-tensor":  # a [1, 1] tensor was broadcast into the weights
        weights = load_file(step / "trainable.safetensors")
        name = next(iter(weights))
        weights[name] = torch.zeros(1, 1)
        save_file(weights, step / "trainable.safetensors")
    elif how == "other-dtype":
        weights = {k: v.double() for k, v in load_file(step / "trainable.safetensors").items()}
        save_file(weights, step / "trainable.safetensors")
    elif how == "truncated-weights":
        data = (step / "trainable.safetensors").read_bytes()
        (step / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "step-beyond-the-run":
        state = json.loads((step / "state.json").read_text())
        state["step"] = 99
        (step / "state.json").write_text(json.dumps(state))
    elif how == "state-not-json":
        (step / "state.json").write_text("{not json")
    elif how == "state-not-utf8":
        (step / "state.json").write_bytes(b"\xff\xfe\x00")
    elif how == "nan-moment":
        moments = load_file(step / "optimizer.safetensors")
        key = next(k for k in moments if k.endswith("/exp_avg"))
        moments[key] = torch.full_like(moments[key], float("nan"))
        save_file(moments, step / "optimizer.safetensors")
    elif how == "foreign-optimizer-tensor":
        moments = load_file(step / "optimizer.safetensors")
        moments["model.embed_tokens.weight/exp_avg"] = torch.zeros(2)
        save_file(moments, step / "optimizer.safetensors")
    elif how == "no-rng":
        (step / "rng.safetensors").unlink()
    elif how == "changed-settings":
        state = json.loads((step / "state.json").read_text())
        state["config"]["lora_r"] = 8
        (step / "state.json").write_text(json.dumps(state))


DAMAGE = {
    "broadcastable-tensor": r"is torch.float32 \[1, 1\] but the model needs torch.float32 \[",
    "other-dtype": r"is torch.float64 .* but the model needs torch.float32",
    "truncated-weights": r"trainable.safetensors: not a readable safetensors file",
    "step-beyond-the-run": r"step 99 is outside this run's 1..3 steps",
    "state-not-json": r"state.json: unreadable checkpoint state",
    "state-not-utf8": r"state.json: unreadable checkpoint state",
    "nan-moment": r"exp_avg' is not finite",
    "foreign-optimizer-tensor": r"unexpected tensor 'model.embed_tokens.weight/exp_avg'",
    "no-rng": r"rng.safetensors: missing",
    "changed-settings": r"the settings changed \(lora_r: 8 -> 2\)",
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_and_changes_nothing(checkpointed, how):
    import re

    _damage(checkpointed / "checkpoints" / "step-0000002", how)
    before = _digest(checkpointed)
    code, output = _resume(checkpointed)
    assert code == 1, output
    assert output.count("\n") == 1 and output.startswith("Error: ")
    assert re.search(DAMAGE[how], output), output
    assert _digest(checkpointed) == before


def test_resume_needs_a_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    run_unlearn(UnlearnConfig(model=str(tiny), out=str(out), **TINY), progress=False)
    with pytest.raises(TrainingError, match=r"holds no checkpoint to continue from"):
        run_unlearn(UnlearnConfig(model=str(tiny), out=str(out), resume=True, **TINY))
