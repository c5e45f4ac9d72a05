"""Stage 1 on accelerate's engines, two CPU processes under `accelerate launch` (gloo).

The runs are tests/distributed_runs.py's scenarios on a tiny random Llama; each engine's runs
share one launch (and one more to resume), so a test costs seconds, not a launch each.

- DDP: two processes equal one process with twice the micro-batches per step (the same
  micro-batches: with gradient accumulation 2), to fp32 rounding, for LoRA and --full, every
  term included (the KL through the frozen reference); with the per-sample terms only, they
  equal one process with twice the batch, and with accumulation they equal four times it;
  both processes end with the same weights.
- FSDP2 and DeepSpeed ZeRO-3 (accelerate enables them only on GPUs; distributed_runs.py builds
  the Accelerator their launch gives there): the weights are sharded over the processes, and
  the results (LoRA, --full, accumulation) equal the same one-process runs.
- A run interrupted after a checkpoint and resumed on two processes ends with the weights of
  the uninterrupted run: LoRA with dropout under DDP (each process's RNG is restored), --full
  under FSDP2 and ZeRO-3 (sharded AdamW states written in full and read back into shards);
  a two-process checkpoint also resumes on one process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_runs import settings
from safetensors.torch import load_file
from tiny_models import tiny_model_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("distributed_runs.py")
LAUNCHERS = {
    "ddp": ["--multi_gpu"],  # torchrun; with no GPU the processes use gloo on the CPU
    "fsdp": ["--multi_gpu"],  # the script marks the Accelerator FSDP2 (see its docstring)
    "deepspeed": ["--use_deepspeed", "--zero_stage", "3"],
}
# fp32 rounding (another order of the gradient sums), amplified by Adam: an element whose
# gradient is near zero moves by lr·m/√v, which rounding changes relatively much; so 1e-4
# relative, and 1e-4 of the tensor's largest value absolute
RELATIVE = 1e-4


def launch(engine: str, model: Path, out: Path, names: list[str], flag: str | None = None):
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch", *LAUNCHERS[engine],
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(SCRIPT), engine, str(model), str(out), ",".join(names),
        *([flag] if flag else []),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def trained(run: Path) -> dict[str, torch.Tensor]:
    """The stage-1 result of a run folder: the adapter's or the full model's tensors."""
    adapter = run / "stage1" / "adapter" / "adapter_model.safetensors"
    return load_file(
        adapter if adapter.is_file() else run / "stage1" / "model" / "model.safetensors"
    )


def assert_same(got: dict, want: dict, exact: bool = False) -> None:
    assert got.keys() == want.keys() and got
    for name, value in want.items():
        scale = float(value.abs().max()) * RELATIVE
        tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=RELATIVE, atol=scale)
        torch.testing.assert_close(got[name], value, **tolerance, msg=name)


def reports(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def one_process(tiny: Path, out: Path, name: str, **overrides) -> Path:
    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.pipeline import run_unlearn

    config = UnlearnConfig(model=str(tiny), out=str(out), **settings(name, **overrides))
    return run_unlearn(config, progress=False)


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory) -> dict[str, Path]:
    """One-process runs to compare with: the two processes' micro-batches in one step."""
    root = tmp_path_factory.mktemp("single")
    runs = {
        "lora": dict(grad_accum=2),
        "full": dict(grad_accum=2),
        "lora-per-sample": dict(batch_size=2),
        "full-per-sample": dict(batch_size=2),
        "lora-accum-per-sample": dict(batch_size=4, grad_accum=1),
        "full-resume": dict(grad_accum=2),
    }
    return {name: one_process(tiny, root / name, name, **kw) for name, kw in runs.items()}


DDP_RUNS = ["lora", "full", "lora-per-sample", "full-per-sample", "lora-accum-per-sample"]


@pytest.fixture(scope="module")
def ddp(tiny, tmp_path_factory) -> Path:
    """One launch with every DDP run, the last interrupted after its checkpoint; a second
    launch resumes it."""
    out = tmp_path_factory.mktemp("ddp")
    cut = launch("ddp", tiny, out, [*DDP_RUNS, "resume", "resume-cut"], "--interrupt")
    assert cut.returncode != 0 and "KeyboardInterrupt" in cut.stderr, cut.stderr[-3000:]
    assert (out / "resume-cut" / "checkpoints" / "step-0000002").is_dir()
    assert not (out / "resume-cut" / "model").exists()
    ok(launch("ddp", tiny, out, ["resume-cut"], "--resume"))
    return out


def test_ddp_processes_end_with_the_same_weights(ddp):
    for name in ("lora", "full"):
        assert [r["engine"] for r in reports(ddp, name)] == ["ddp", "ddp"]
        rank0, rank1 = (load_file(ddp / f"{name}.rank{r}.safetensors") for r in (0, 1))
        assert_same(rank0, rank1, exact=True)
    log = [json.loads(line) for line in (ddp / "lora" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert (ddp / "lora" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["lora", "full"])
def test_ddp_equals_one_process_with_twice_the_micro_batches(ddp, single, name):
    assert_same(trained(ddp / name), trained(single[name]))


@pytest.mark.parametrize("name", ["lora-per-sample", "full-per-sample", "lora-accum-per-sample"])
def test_ddp_equals_one_process_with_a_larger_batch(ddp, single, name):
    """gd alone (random answers and the KL are off) averages per sample: two processes of
    batch 1 are one of batch 2; with accumulation 2 they are one of batch 4."""
    assert_same(trained(ddp / name), trained(single[name]))


def test_ddp_resume_after_an_interrupt_equals_the_uninterrupted_run(ddp):
    assert_same(trained(ddp / "resume-cut"), trained(ddp / "resume"), exact=True)
    logs = [(ddp / n / "log.jsonl").read_text() for n in ("resume", "resume-cut")]
    assert logs[0] == logs[1]


def test_a_two_process_checkpoint_resumes_on_one_process(ddp, tiny, tmp_path, capfd):
    """The checkpoint holds full tensors, so one process continues it (with other
    micro-batches per step than two processes would draw)."""
    import shutil

    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.pipeline import run_unlearn

    run = tmp_path / "run"
    shutil.copytree(ddp / "resume-cut", run)
    config = UnlearnConfig(model=str(tiny), out=str(run), resume=True, **settings("resume-cut"))
    run_unlearn(config, progress=False)
    assert "was written by 2 processes and resumes on 1" in capfd.readouterr().err
    resumed = trained(run)
    assert resumed.keys() == trained(ddp / "resume").keys()
    assert all(torch.isfinite(v).all() for v in resumed.values())


NO_DEEPSPEED = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


@pytest.mark.parametrize("engine", ["fsdp", pytest.param("deepspeed", marks=NO_DEEPSPEED)])
def test_sharded_engines_equal_one_process_and_resume(engine, tiny, single, tmp_path):
    names = ["lora", "full", "lora-accum-per-sample", "full-resume", "full-resume-cut"]
    cut = launch(engine, tiny, tmp_path, names, "--interrupt")
    assert cut.returncode != 0 and "KeyboardInterrupt" in cut.stderr, cut.stderr[-5000:]
    ok(launch(engine, tiny, tmp_path, ["full-resume-cut"], "--resume"))
    kind = {"fsdp": "DTensor", "deepspeed": "zero3"}[engine]
    for name in ("lora", "full"):
        ranks = reports(tmp_path, name)
        assert [(r["engine"], r["parameter"]) for r in ranks] == [(engine, kind)] * 2
        whole = sum(v.numel() for v in trained(single[name]).values())
        if name == "full":  # each process holds about half of every weight
            assert whole / 2 <= ranks[0]["local_elements"] < whole / 2 + 64
        assert_same(trained(tmp_path / name), trained(single[name]))
    for name in ("lora-accum-per-sample", "full-resume"):  # accumulation 2; checkpoints
        assert_same(trained(tmp_path / name), trained(single[name]))
    assert_same(
        trained(tmp_path / "full-resume-cut"), trained(tmp_path / "full-resume"), exact=True
    )
