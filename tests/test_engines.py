"""One process: what the engines' code does without a launcher, and the memory savers.

The Accelerator comes from the launcher (a plain run is one CPU process as before);
configurations that cannot run are refused in one line; gradient checkpointing changes
nothing but memory; bf16 weights under --full reach stage 2 in the base checkpoint's dtype;
a full model too large for one file is written shard by shard and still loads and negates.
(Two processes: tests/test_distributed.py.)
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model_dir

from sku_fast.errors import TrainingError
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.engines import _configure_deepspeed, engine_of, make_accelerator

TINY = dict(steps=2, lora_r=4, lora_alpha=8, max_length=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_a_plain_run_is_one_process_with_our_accumulation():
    accelerator = make_accelerator(UnlearnConfig(grad_accum=3).resolve())
    assert engine_of(accelerator) == "none" and accelerator.num_processes == 1
    assert accelerator.gradient_accumulation_steps == 3
    assert str(accelerator.device) == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only without CUDA")
@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharding_engines_without_a_gpu_are_refused(monkeypatch, variable):
    monkeypatch.setenv(variable, "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="need GPUs.*examples/ddp.yaml"):
        make_accelerator(UnlearnConfig().resolve())


def test_fsdp_version_1_is_refused():
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(TrainingError, match="fsdp_version: 2"):
        engine_of(accelerator)


def _deepspeed(**settings):
    plugin = SimpleNamespace(deepspeed_config=dict(settings))
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=4)


def test_deepspeed_takes_clipping_accumulation_and_batch_from_the_run():
    accelerator = _deepspeed(gradient_clipping="auto", zero_optimization={"stage": 3})
    config = UnlearnConfig(max_grad_norm=0.5, grad_accum=2, batch_size=3).resolve()
    _configure_deepspeed(accelerator, config)
    settings = accelerator.state.deepspeed_plugin.deepspeed_config
    assert settings["gradient_clipping"] == 0.5
    assert settings["gradient_accumulation_steps"] == 2
    assert settings["train_micro_batch_size_per_gpu"] == 3
    assert settings["train_batch_size"] == 3 * 2 * 4


def test_a_deepspeed_clipping_other_than_the_runs_is_refused():
    accelerator = _deepspeed(gradient_clipping=1.0)
    with pytest.raises(TrainingError, match="clips gradients at 1.0 but max_grad_norm is 0.0"):
        _configure_deepspeed(accelerator, UnlearnConfig().resolve())


def _train(tiny: Path, out: Path, on_step=None, **overrides):
    from sku_fast.unlearn.data import demo_data_path, load_qa_pairs
    from sku_fast.unlearn.models import load_model, load_tokenizer
    from sku_fast.unlearn.network import prepare_model
    from sku_fast.unlearn.objective import objective_for
    from sku_fast.unlearn.trainer import train

    config = UnlearnConfig(model=str(tiny), out=str(out), **{**TINY, **overrides}).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = prepare_model(load_model(tiny), config)
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
    return {name: p.detach().clone() for name, p in model.trainable}, model


@pytest.mark.parametrize("lora", [True, False])
def test_gradient_checkpointing_changes_no_weight(tiny, tmp_path, lora):
    lr = 1e-2 if lora else 1e-3
    plain, model = _train(tiny, tmp_path / "plain", lora=lora, lr=lr)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.network.modules())
    recomputed, model = _train(
        tiny, tmp_path / "ckpt", lora=lora, lr=lr, gradient_checkpointing=True
    )
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.network.modules())
    for name, value in plain.items():
        torch.testing.assert_close(recomputed[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_weights_under_full_reach_stage_2_in_the_bases_dtype(tiny, tmp_path):
    from sku_fast.unlearn.pipeline import run_unlearn

    config = UnlearnConfig(model=str(tiny), out=str(tmp_path / "run"), lora=False, lr=1e-3,
                           dtype="bfloat16", **TINY)  # fmt: skip
    out = run_unlearn(config, progress=False)
    base = load_file(tiny / "model.safetensors")
    tuned = load_file(out / "stage1" / "model" / "model.safetensors")
    assert {k: v.dtype for k, v in tuned.items()} == {k: v.dtype for k, v in base.items()}
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    assert all(
        torch.isfinite(v).all() for v in load_file(out / "model" / "model.safetensors").values()
    )


def test_a_full_model_is_written_shard_by_shard_and_negates(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from sku_fast.engine.arithmetic import negate
    from sku_fast.unlearn.fullstate import write_model_dir
    from sku_fast.unlearn.models import load_model, load_tokenizer
    from sku_fast.unlearn.network import prepare_model

    config = UnlearnConfig(model=str(tiny), lora=False).resolve()
    model = prepare_model(load_model(tiny), config)
    with torch.no_grad():
        for _, parameter in model.trainable:
            parameter.add_(0.01)
    folder = tmp_path / "tuned"
    folder.mkdir()
    write_model_dir(model, load_tokenizer(tiny), folder, keep=True, shard_bytes=40_000)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    for name, value in model.network.state_dict().items():
        assert torch.equal(loaded[name], value), name
    negate(tiny, folder, tmp_path / "negated", 1.0, progress=None)
    base = load_file(tiny / "model.safetensors")
    negated = load_file(tmp_path / "negated" / "model.safetensors")
    for name, value in base.items():
        torch.testing.assert_close(negated[name], value - 0.01, rtol=0, atol=1e-6)


def test_a_checkpoint_in_shards_resumes_exactly(tiny, tmp_path, monkeypatch):
    """Checkpoints larger than a shard are written as shards with an index, read back lazily
    and checked the same way."""
    monkeypatch.setattr("sku_fast.unlearn.fullstate.SHARD_BYTES", 20_000)
    settings = dict(lora=False, lr=1e-3, steps=3, checkpoint_every=2)
    whole, _ = _train(tiny, tmp_path / "whole", **settings)

    def stop(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny, tmp_path / "cut", on_step=stop, **settings)
    step = tmp_path / "cut" / "checkpoints" / "step-0000002"
    for prefix in ("trainable", "optimizer"):
        assert (step / f"{prefix}.safetensors.index.json").is_file()
        assert len(list(step.glob(f"{prefix}-*-of-*.safetensors"))) > 2
    resumed, _ = _train(tiny, tmp_path / "cut", resume=True, **settings)
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name

    shard = sorted(step.glob("trainable-*-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(TrainingError, match=f"{shard.name}: missing"):
        _train(tiny, tmp_path / "cut", resume=True, **settings)
