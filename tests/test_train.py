"""Stage-1 trainer on a tiny random Llama: exact steps, linear decay, accumulation, resume
equivalence, full fine-tuning with a frozen reference and non-finite losses.

`tiny_tokenizer` and `tiny_model_dir` (from tiny_models) are also imported from here by the
pipeline, distributed, objective and data tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model_dir
from tiny_models import tiny_tokenizer as tiny_tokenizer  # re-exported for test_data

from sku_fast.errors import TrainingError
from sku_fast.unlearn.checkpointing import latest_checkpoint
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.data import demo_data_path, load_qa_pairs
from sku_fast.unlearn.network import prepare_model
from sku_fast.unlearn.objective import objective_for
from sku_fast.unlearn.trainer import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _config(tiny: Path, out: Path, **overrides) -> UnlearnConfig:
    values = dict(model=str(tiny), steps=4, out=str(out), lora_r=4, lora_alpha=8, max_length=64)
    return UnlearnConfig(**{**values, **overrides}).resolve()


def _run(tiny: Path, out: Path, on_step=None, models=None, **overrides):
    from sku_fast.unlearn.engines import make_accelerator
    from sku_fast.unlearn.models import load_model, load_tokenizer

    config = _config(tiny, out, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    model = prepare_model(load_model(tiny), config)
    if models is not None:
        models.append(model)
    train(
        model,
        load_tokenizer(tiny),
        load_qa_pairs(demo_data_path("harmful")),
        load_qa_pairs(demo_data_path("normal")),
        objective_for(config),
        config,
        out,
        make_accelerator(config),
        progress=False,
        on_step=on_step,
    )
    return model, [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.trainable}


def test_exact_steps_and_linear_decay(tiny, tmp_path):
    model, log = _run(tiny, tmp_path / "a", steps=5, lr=1e-3)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * (5 - s) / 5 for s in range(5)])
    assert set(log[0]) == {"step", "lr", "gd", "rd", "pd", "loss"}
    assert log[0]["loss"] == pytest.approx(log[0]["gd"] + log[0]["rd"] + 3 * log[0]["pd"])
    assert all(name.count("lora_") == 1 for name, _ in model.trainable)
    assert any(
        not torch.equal(p, torch.zeros_like(p)) for n, p in _weights(model).items() if "B" in n
    )


def test_gradient_accumulation_matches_a_larger_batch(tiny, tmp_path):
    """With the per-sample terms only, 2 micro-batches of 1 are 1 batch of 2 (the same samples;
    the padding of the shorter row in the batch of 2 must not count)."""
    ablate = dict(random_disassociation=False, preservation_divergence=False, steps=3, lr=1e-2)
    small, log_small = _run(tiny, tmp_path / "small", batch_size=1, grad_accum=2, **ablate)
    large, log_large = _run(tiny, tmp_path / "large", batch_size=2, grad_accum=1, **ablate)
    assert [r["gd"] for r in log_small] == pytest.approx([r["gd"] for r in log_large], rel=1e-5)
    for name, value in _weights(large).items():
        torch.testing.assert_close(_weights(small)[name], value, rtol=1e-4, atol=1e-6)


class Interrupted(Exception):
    pass


def test_resume_continues_to_the_uninterrupted_result(tiny, tmp_path):
    settings = dict(steps=5, checkpoint_every=2, lr=1e-2, lora_dropout=0.1)
    full, full_log = _run(tiny, tmp_path / "full", **settings)

    def stop_at_3(step, record):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(tiny, tmp_path / "cut", on_step=stop_at_3, **settings)
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000002"
    resumed, resumed_log = _run(tiny, tmp_path / "cut", resume=True, **settings)
    assert resumed_log == full_log  # the log is cut back to the checkpoint, then continued
    for name, value in _weights(full).items():
        assert torch.equal(_weights(resumed)[name], value), name


def test_resume_refuses_changed_settings(tiny, tmp_path):
    def stop(step, record):
        raise Interrupted

    with pytest.raises(Interrupted):
        _run(tiny, tmp_path, on_step=stop, steps=4, checkpoint_every=1)
    with pytest.raises(TrainingError, match=r"settings changed \(lr: 0.0002 -> 0.001\)"):
        _run(tiny, tmp_path, resume=True, steps=4, checkpoint_every=1, lr=1e-3)


def test_resume_without_checkpoint_is_an_error(tiny, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        _run(tiny, tmp_path, resume=True)


def test_full_fine_tuning_keeps_a_frozen_reference(tiny, tmp_path):
    from sku_fast.unlearn.models import load_model

    model, log = _run(tiny, tmp_path, lora=False, steps=2, lr=1e-3)
    original = load_model(tiny).state_dict()
    reference = model.reference.state_dict()
    assert all(torch.equal(reference[k], original[k]) for k in original)
    changed = [k for k, v in model.network.state_dict().items() if not torch.equal(v, original[k])]
    assert "lm_head.weight" in changed and len(changed) == len(original)
    assert log[1]["pd"] > 0  # after one step the model differs from its reference


def test_non_finite_loss_names_step_and_term(tiny, tmp_path):
    models = []

    def poison(step, record):  # after step 1, every trainable weight becomes NaN
        with torch.no_grad():
            for _, parameter in models[0].trainable:
                parameter.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"step 2: the gd loss term is nan"):
        _run(tiny, tmp_path, on_step=poison, models=models, steps=3)


def test_the_kl_cap_stops_the_runaway_that_the_monitor_reports(tiny, tmp_path):
    """Full fine-tuning of a tiny model with the published diverging KL runs away as the real
    runs do (the KL climbs to tens of nats per token while gd rises) and the log says so;
    with a cap κ the KL stays at κ and gd keeps falling."""
    settings = dict(steps=100, lr=1e-2, epsilon=[0.1, 0.1, 1.0], lora=False, log_every=1,
                    preservation="diverge")  # fmt: skip
    _, free = _run(tiny, tmp_path / "free", **settings)
    _, capped = _run(tiny, tmp_path / "capped", kl_cap=0.1, **settings)

    kl = [r["pd"] for r in free]
    gd = [r["gd"] for r in free]
    assert max(kl) > 10 and gd[-1] > 1.5 * min(gd)
    warnings = [r["warning"] for r in free if "warning" in r]
    assert warnings and "the diverging term is running away" in warnings[0]

    assert max(r["pd"] for r in capped) <= 0.1 + 1e-4
    assert capped[-1]["gd"] < capped[0]["gd"] and not any("warning" in r for r in capped)
