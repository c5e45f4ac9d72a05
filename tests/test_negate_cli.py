"""`sku-fast arithmetic`, `negate` and `negate-lora` on the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from oracles.engine import combine_reference
from safetensors.torch import load_file, save_file
from tiny_models import llama_config

from sku_fast.cli import main


@pytest.fixture()
def pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(37, 53, generator=g).bfloat16(), "pos": torch.arange(9)}
    tuned = {"w": (base["w"].float() + 0.01 * torch.randn(37, 53, generator=g)).bfloat16()}
    tuned["pos"] = base["pos"] + 1
    save_file(base, tmp_path / "base.safetensors", metadata={"format": "pt"})
    save_file(tuned, tmp_path / "tuned.safetensors", metadata={"format": "pt"})
    return tmp_path, base, tuned


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_negate(pair):
    root, base, tuned = pair
    result = run("negate", root / "base.safetensors", root / "tuned.safetensors", root / "out",
                 "--scale", "0.5", "--threads", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"-> {root / 'out'} in" in result.output
    got = load_file(root / "out" / "model.safetensors")
    ref = combine_reference(base, [(-0.5, tuned)])
    assert torch.equal(got["w"].view(torch.int16), ref["w"].view(torch.int16))
    assert torch.equal(got["pos"], base["pos"])


def test_arithmetic_with_several_models_and_dtype(pair):
    root, base, tuned = pair
    t = root / "tuned.safetensors"
    adds = ["--add", f"{t}:0.25", "--add", f"{t}:-1.5"]
    result = run("arithmetic", root / "base.safetensors", root / "sum.safetensors", *adds,
                 "--dtype", "f32", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output == ""
    got = load_file(root / "sum.safetensors")
    ref = combine_reference(base, [(0.25, tuned), (-1.5, tuned)], dtype=torch.float32)
    assert got["w"].dtype == torch.float32
    assert torch.equal(got["w"].view(torch.int32), ref["w"].view(torch.int32))


@pytest.mark.parametrize(
    "value, message",
    [
        ("no-weight", "expected TUNED:WEIGHT"),
        ("x.safetensors:half", "weight 'half' is not a number"),
    ],
)
def test_bad_add_is_a_usage_error(pair, value, message):
    root, _, _ = pair
    result = run("arithmetic", root / "base.safetensors", root / "o", "--add", value)
    assert result.exit_code == 2
    assert message in result.output
    assert not (root / "o").exists()


def test_errors_print_one_line_and_exit_1(pair):
    root, _, _ = pair
    (root / "out").mkdir()
    result = run("negate", root / "base.safetensors", root / "tuned.safetensors", root / "out")
    assert result.exit_code == 1
    assert "Error: output" in result.output and "already exists" in result.output
    assert "Traceback" not in result.output

    (root / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    result = run("negate", root / "base.safetensors", root / "broken.safetensors", root / "o2")
    assert result.exit_code == 1
    assert f"Error: {root / 'broken.safetensors'}: invalid JSON header" in result.output
    assert not (root / "o2").exists()

    result = run("negate", root / "base.safetensors", root / "tuned.safetensors", root / "o3",
                 "--scale", "nan")  # fmt: skip
    assert result.exit_code == 1
    assert "must be finite, got nan" in result.output


def test_negate_command_imports_nothing_heavy(pair):
    """The engine path stays light: no torch, transformers, triton or even numpy."""
    root, _, _ = pair
    code = (
        "import sys\nfrom sku_fast.cli import main\n"
        f"main(['negate', {str(root / 'base.safetensors')!r}, {str(root / 'tuned.safetensors')!r},"
        f" {str(root / 'o')!r}, '--quiet'], standalone_mode=False)\n"
        "heavy = ('torch', 'transformers', 'triton', 'numpy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
    assert (root / "o" / "model.safetensors").is_file()


# Run in a fresh interpreter where importing torch and the training stack fails, as on a
# base install (`pip install sku-fast`, no extras).
WITHOUT_TRAIN_EXTRA = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = ("torch", "transformers", "triton", "peft", "accelerate", "safetensors")

class Blocked(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Blocked())
from sku_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _without_train_extra(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TRAIN_EXTRA, *map(str, args)],
        capture_output=True,
        text=True,
    )


def _hand_made_adapter(path, rows: int, cols: int) -> None:
    """A PEFT LoRA adapter (rank 2) on a module "proj" with a [rows, cols] weight, written
    without peft."""
    import json

    path.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file(
        {
            "base_model.model.proj.lora_A.weight": torch.randn(2, cols, generator=g),
            "base_model.model.proj.lora_B.weight": torch.randn(rows, 2, generator=g),
        },
        path / "adapter_model.safetensors",
    )
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_engine_commands_work_without_torch(pair):
    """negate, arithmetic and negate-lora need only the base install; unlearn says which
    extra it needs, in one line."""
    root, base, _ = pair
    save_file({"proj.weight": torch.randn(37, 53)}, root / "model.safetensors")
    _hand_made_adapter(root / "adapter", 37, 53)
    for args in (
        ["negate", root / "base.safetensors", root / "tuned.safetensors", root / "neg"],
        ["negate", root / "model.safetensors", root / "adapter", root / "neg-lora"],
        ["arithmetic", root / "base.safetensors", root / "sum", "--add",
         f"{root / 'tuned.safetensors'}:0.5"],
        ["negate-lora", root / "adapter", root / "negated-adapter"],
    ):  # fmt: skip
        result = _without_train_extra(*args, "--quiet")
        assert result.returncode == 0, (args, result.stderr)
    assert load_file(root / "neg" / "model.safetensors")["w"].shape == base["w"].shape
    b = load_file(root / "adapter" / "adapter_model.safetensors")
    negated = load_file(root / "negated-adapter" / "adapter_model.safetensors")
    key = "base_model.model.proj.lora_B.weight"
    assert torch.equal(negated[key], -b[key])

    result = _without_train_extra("unlearn", "--out", root / "run", "--steps", "1")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Error: `sku-fast unlearn` needs the [train] extra (module 'torch' is not installed): "
        "pip install 'sku-fast[train]'"
    )
    assert not (root / "run").exists()


def test_negate_lora_and_negate_with_an_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = llama_config(
        vocab_size=64, intermediate_size=40, num_hidden_layers=1, num_key_value_heads=4,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapted = peft.get_peft_model(model, lora_config)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero; give the adapter a real delta
    adapted.save_pretrained(tmp_path / "adapter")

    result = run("negate-lora", tmp_path / "adapter", tmp_path / "negated", "--scale", "2")
    assert result.exit_code == 0, result.output
    before = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    after = load_file(tmp_path / "negated" / "adapter_model.safetensors")
    assert set(before) == set(after)
    for name, value in before.items():
        expected = -2 * value if "lora_B" in name else value
        assert torch.equal(after[name], expected), name

    # merging the adapter while streaming: base − λ·scaling·B·A, against PEFT's own merge
    result = run("negate", tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", "--quiet")
    assert result.exit_code == 0, result.output
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    reference = adapted.merge_and_unload().state_dict()  # base + τ
    base = load_file(tmp_path / "base" / "model.safetensors")
    for name, value in merged.items():
        expected = 2 * base[name] - reference[name]  # base − τ
        assert torch.allclose(value, expected, atol=1e-6), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])
