"""`accelerate launch` with two CPU processes: the unchanged pipeline trains on both ranks
(each on its own micro-batches), averages the gradients and ends with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model_dir

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from accelerate import PartialState
    from safetensors.torch import save_file

    from sku_fast.unlearn import trainer as train_module
    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.pipeline import run_unlearn

    model_dir, out = sys.argv[1], Path(sys.argv[2])
    trained = []
    original_train = train_module.train

    def capture(model, *args, **kwargs):  # keep each rank's trained model
        trained.append(model)
        return original_train(model, *args, **kwargs)

    train_module.train = capture
    config = UnlearnConfig(
        model=model_dir, out=str(out / "run"), steps=3, lora_r=4, lora_alpha=8,
        max_length=96, lr=1e-2,
    )
    run_unlearn(config, progress=False)
    rank = PartialState().process_index
    weights = {name: p.detach().contiguous() for name, p in trained[0].trainable}
    save_file(weights, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.seen").write_text(str(PartialState().num_processes))
    """
)


@pytest.mark.slow
def test_two_process_cpu_run_has_identical_weights_on_both_ranks(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    script = tmp_path / "launch_unlearn.py"
    script.write_text(SCRIPT)
    launcher = Path(sys.executable).with_name("accelerate")
    command = [
        str(launcher),
        "launch",
        "--multi_gpu",  # torchrun; with no GPU the processes use gloo on the CPU
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(model),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.seen").read_text() for r in (0, 1)] == ["2", "2"]
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 8  # A and B of 4 modules
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
    assert any(bool(v.abs().sum() > 0) for k, v in rank0.items() if "lora_B" in k)
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert (run / "model" / "model.safetensors").is_file()
