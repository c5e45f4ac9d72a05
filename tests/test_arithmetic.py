"""The streaming engine against the plain numpy/torch reference, bit for bit.

Every output tensor must equal `oracles.engine.combine_reference` exactly (NaN where
the reference has NaN), across dtypes, layouts, odd sizes, several tuned models and low-rank
terms. The reference rounds with torch; the engine with its own C++ conversions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles.engine import combine_reference
from safetensors.torch import load_file, save_file
from tiny_models import llama_config

from sku_fast import _C
from sku_fast.engine import adapter as lora
from sku_fast.engine.arithmetic import negate, task_arithmetic
from sku_fast.engine.checkpoint import INDEX_NAME, open_checkpoint
from sku_fast.errors import CheckpointError

BITS = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
TORCH_DTYPE = {
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "f32": torch.float32,
    "f64": torch.float64,
}


def assert_bitwise_equal(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert list(out) == list(ref) or set(out) == set(ref)
    for name, expected in ref.items():
        got = out[name]
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        if expected.dtype in BITS:
            nan = torch.isnan(expected)
            assert torch.equal(torch.isnan(got), nan), f"{name}: NaN positions differ"
            bits = BITS[expected.dtype]
            mismatch = (got.view(bits) != expected.view(bits)) & ~nan
            assert not mismatch.any(), (
                f"{name}: {int(mismatch.sum())} of {expected.numel()} elements differ, first "
                f"got {got[mismatch][:3].tolist()} expected {expected[mismatch][:3].tolist()}"
            )
        else:
            assert torch.equal(got, expected), name


def perturb(tensors: dict[str, torch.Tensor], seed: int, size: float = 0.01):
    """A fine-tuned twin: floats moved by a small random step, integers changed too (the engine
    must copy those from the base)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            step = torch.randn(t.shape, generator=g, dtype=torch.float64) * size
            out[name] = (t.double() + step).to(t.dtype)
        elif t.dtype == torch.bool:
            out[name] = ~t
        else:
            out[name] = t + 1
    return out


def random_tensors(spec: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in spec.items():
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        elif dtype == torch.bool:
            out[name] = torch.rand(shape, generator=g) > 0.5
        else:
            out[name] = torch.randint(0, 100, shape, generator=g).to(dtype)
    return out


def save_sharded(tensors: dict[str, torch.Tensor], root: Path, shards: int) -> Path:
    """A sharded directory like transformers writes it, with a config and tokenizer file."""
    root.mkdir(parents=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, root / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / INDEX_NAME).write_text(json.dumps(index))
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    return root


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


SIZES_SPEC = {
    "scalar": ((), torch.float32),
    "empty": ((0, 7), torch.bfloat16),
    "empty_f16": ((3, 0), torch.float16),
    "odd_63": ((63,), torch.bfloat16),
    "odd_507": ((3, 13, 13), torch.bfloat16),
    "vocab_32001": ((32001,), torch.float16),
    # more than one 1 MiB chunk of the engine, not a multiple of its 2048-element block
    "multi_chunk": ((1031, 1027), torch.bfloat16),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.7], ids=lambda s: f"scale{s}")
def test_negate_single_file_matches_reference(tmp_path, dtype, scale):
    spec = {
        "w": ((257, 129), dtype),
        "b": ((129,), dtype),
        "s": ((), dtype),
        "z": ((0,), dtype),
    }
    base = random_tensors(spec, seed=1)
    tuned = perturb(base, seed=2)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    out = negate(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "out")
    if scale != 1.0:
        out = negate(
            tmp_path / "base.safetensors",
            tmp_path / "tuned.safetensors",
            tmp_path / "out",
            scale,
            overwrite=True,
        )
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    got = load_file(out / "model.safetensors")
    assert_bitwise_equal(got, combine_reference(base, [(-scale, tuned)]))
    # the result is a real change: most elements moved away from the base
    if dtype != torch.float16:
        assert (got["w"] != base["w"]).float().mean() > 0.5


def test_odd_sizes_scalars_and_empty_tensors(tmp_path):
    base = random_tensors(SIZES_SPEC, seed=3)
    tuned = perturb(base, seed=4)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    out = negate(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "out")
    assert_bitwise_equal(
        load_file(out / "model.safetensors"), combine_reference(base, [(-1.0, tuned)])
    )


MIXED_SPEC = {
    "bf16": ((33, 65), torch.bfloat16),
    "f16": ((65, 33), torch.float16),
    "f32": ((31,), torch.float32),
    "f64": ((5, 7), torch.float64),
    "positions": ((17,), torch.int64),
    "ids": ((9,), torch.int32),
    "mask": ((4, 4), torch.bool),
    "bytes": ((6,), torch.uint8),
}


@pytest.mark.parametrize("out_dtype", [None, "bf16", "f16", "f32", "f64"], ids=str)
def test_mixed_dtypes_and_output_dtype(tmp_path, out_dtype):
    base = random_tensors(MIXED_SPEC, seed=5)
    tuned = perturb(base, seed=6)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    out = negate(
        tmp_path / "base.safetensors",
        tmp_path / "tuned.safetensors",
        tmp_path / "out",
        dtype=out_dtype,
    )
    got = load_file(out / "model.safetensors")
    ref = combine_reference(base, [(-1.0, tuned)], dtype=TORCH_DTYPE.get(out_dtype))
    assert_bitwise_equal(got, ref)
    # integers and bools are the base's, not the tuned model's
    assert torch.equal(got["positions"], base["positions"])
    assert torch.equal(got["mask"], base["mask"])


def test_special_values_round_once(tmp_path):
    """NaN, infinities, signed zeros, subnormals and the f16 overflow edge, rounded from f32."""
    specials = torch.tensor(
        [math.nan, math.inf, -math.inf, 0.0, -0.0, 65504.0, 65519.99, 65520.0, -65536.0,
         6e-8, 2.98e-8, 2.99e-8, -5.96e-8, 6.1e-5, 1e-40, -1e-45, 3.0e38, 1.0 + 2**-11,
         1.0 + 3 * 2**-11, 1.0 + 2**-8, 1.0 + 3 * 2**-8],
        dtype=torch.float32,
    )  # fmt: skip
    g = torch.Generator().manual_seed(7)
    # random values across the whole f16/bf16 exponent range, including their subnormals
    spread = torch.randn(20000, generator=g) * torch.exp2(
        torch.randint(-30, 20, (20000,), generator=g)
    )
    base = {"specials": specials, "spread": spread.float()}
    tuned = {"specials": torch.zeros_like(specials), "spread": torch.zeros_like(base["spread"])}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    for out_dtype in ("f16", "bf16"):
        # weight 0 keeps base exactly in fp32 except NaN/inf handling: 0 * (0 - inf) is NaN
        out = task_arithmetic(
            tmp_path / "base.safetensors",
            [(tmp_path / "tuned.safetensors", 0.0)],
            tmp_path / f"out_{out_dtype}",
            dtype=out_dtype,
        )
        got = load_file(out / "model.safetensors")
        ref = combine_reference(base, [(0.0, tuned)], dtype=TORCH_DTYPE[out_dtype])
        assert_bitwise_equal(got, ref)
        # and the rounding is torch's own f32 -> f16/bf16 conversion of the finite base values
        finite = torch.isfinite(base["spread"])
        expected = base["spread"][finite].to(TORCH_DTYPE[out_dtype])
        assert torch.equal(got["spread"][finite].view(torch.int16), expected.view(torch.int16))


def test_several_tuned_models_mixed_weights(tmp_path):
    spec = {
        "a": ((65, 63), torch.bfloat16),
        "b": ((1000,), torch.float32),
        "s": ((), torch.float16),
    }
    base = random_tensors(spec, seed=8)
    models = [perturb(base, seed=9 + i, size=0.05) for i in range(3)]
    weights = [0.5, -1.25, 2.0]
    save_file(base, tmp_path / "base.safetensors")
    tuned = []
    for i, (model, weight) in enumerate(zip(models, weights, strict=True)):
        save_file(model, tmp_path / f"t{i}.safetensors")
        tuned.append((tmp_path / f"t{i}.safetensors", weight))
    out = task_arithmetic(tmp_path / "base.safetensors", tuned, tmp_path / "merged.safetensors")
    assert out.is_file()  # a file base and a .safetensors target give a single file
    ref = combine_reference(base, list(zip(weights, models, strict=True)))
    assert_bitwise_equal(load_file(out), ref)


def test_sharded_layout_copied_and_loads(tmp_path):
    spec = {f"layers.{i}.weight": ((31 + i, 17), torch.bfloat16) for i in range(5)}
    spec["embed"] = ((100, 17), torch.float32)
    spec["step"] = ((), torch.int64)
    base = random_tensors(spec, seed=20)
    tuned = perturb(base, seed=21)
    base_dir = save_sharded(base, tmp_path / "base", shards=3)
    # the tuned model may be laid out differently: one file here
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    save_file(tuned, tuned_dir / "model.safetensors")
    out = negate(base_dir, tuned_dir, tmp_path / "out", 0.5, threads=2)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in base_dir.iterdir())
    assert (out / "config.json").read_text() == (base_dir / "config.json").read_text()
    index = json.loads((out / INDEX_NAME).read_text())
    base_index = json.loads((base_dir / INDEX_NAME).read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in base.values()
    )
    for shard in set(index["weight_map"].values()):
        assert set(load_file(out / shard)) == set(load_file(base_dir / shard))
    assert_bitwise_equal(load_dir(out), combine_reference(base, [(-0.5, tuned)]))
    # our own reader accepts the output as a sharded checkpoint
    assert open_checkpoint(out).kind == "sharded"


def test_threads_do_not_change_the_result(tmp_path):
    base = random_tensors({"w": ((700, 900), torch.bfloat16), "v": ((3001,), torch.float16)}, 30)
    tuned = perturb(base, seed=31)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    one = negate(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "a",
                 threads=1)  # fmt: skip
    four = negate(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "b",
                  threads=4)  # fmt: skip
    assert (one / "model.safetensors").read_bytes() == (four / "model.safetensors").read_bytes()


def test_progress_reports_bytes_up_to_the_total(tmp_path):
    base = random_tensors({"w": ((1024, 1500), torch.float32)}, 40)
    save_file(base, tmp_path / "base.safetensors")
    save_file(perturb(base, 41), tmp_path / "tuned.safetensors")
    seen = []
    out = negate(
        tmp_path / "base.safetensors",
        tmp_path / "tuned.safetensors",
        tmp_path / "out",
        progress=lambda done, total: seen.append((done, total)),
    )
    size = (out / "model.safetensors").stat().st_size
    assert seen[-1] == (size, size)
    assert all(total == size for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_from_pretrained_loads_the_negated_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = llama_config(vocab_size=101, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "tuned", max_shard_size="20KB")
    assert (tmp_path / "base" / INDEX_NAME).is_file()
    out = negate(tmp_path / "base", tmp_path / "tuned", tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ref = combine_reference(load_dir(tmp_path / "base"), [(-1.0, load_dir(tmp_path / "tuned"))])
    state = loaded.state_dict()
    assert_bitwise_equal({name: state[name] for name in ref}, ref)


def _factors(rows: int, cols: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    left = rng.standard_normal((rows, rank), dtype=np.float32)
    right = rng.standard_normal((rank, cols), dtype=np.float32) * np.float32(0.1)
    return left, right


def test_low_rank_and_replaced_terms(tmp_path, monkeypatch):
    """Adapter deltas handed over by lora.adapter_deltas (here made by hand): low-rank terms
    merged row block by row block, a whole replaced tensor, untouched tensors copied."""
    spec = {
        "q": ((1031, 1027), torch.bfloat16),  # several chunks, rows cut across blocks
        "v": ((64, 48), torch.float32),
        "head": ((7, 5), torch.float16),
        "norm": ((48,), torch.bfloat16),
    }
    base = random_tensors(spec, seed=50)
    save_file(base, tmp_path / "base.safetensors")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # read by the patched adapter_deltas only
    replaced = {"modules_to_save.head": perturb({"h": base["head"]}, 51)["h"]}
    save_file(replaced, adapter / "adapter_model.safetensors")
    q_left, q_right = _factors(1031, 1027, 8, 52)
    v_left, v_right = _factors(64, 48, 3, 53)
    deltas = {
        "q": lora.LowRankDelta(q_left, q_right, 0.5),
        "v": lora.LowRankDelta(v_left, v_right, 2.0),
        "head": lora.ReplacedTensor(
            str(adapter / "adapter_model.safetensors"), "modules_to_save.head"
        ),
    }
    monkeypatch.setattr(lora, "is_adapter_dir", lambda path: Path(path) == adapter)
    monkeypatch.setattr(lora, "adapter_deltas", lambda path, shapes: deltas)
    scale = 1.5
    out = negate(tmp_path / "base.safetensors", adapter, tmp_path / "out", scale)
    got = load_file(out / "model.safetensors")
    # with an output dtype, the tensors without a delta are converted too
    as_f32 = negate(tmp_path / "base.safetensors", adapter, tmp_path / "f32", scale, dtype="f32")
    norm = load_file(as_f32 / "model.safetensors")["norm"]
    assert norm.dtype == torch.float32 and torch.equal(norm, base["norm"].float())
    # the weight of a low-rank term is -scale * scaling, folded into the reference's weight
    ref_q = combine_reference({"q": base["q"]}, [(-scale * 0.5, {"q": (q_left, q_right)})])
    ref_v = combine_reference({"v": base["v"]}, [(-scale * 2.0, {"v": (v_left, v_right)})])
    ref_h = combine_reference(
        {"head": base["head"]}, [(-scale, {"head": replaced["modules_to_save.head"]})]
    )
    assert_bitwise_equal(got, {**ref_q, **ref_v, **ref_h, "norm": base["norm"]})
    # the fp32 rank sum is within rounding of the exact delta
    exact = base["q"].double() - scale * 0.5 * torch.from_numpy(
        q_left.astype(np.float64) @ q_right.astype(np.float64)
    )
    assert torch.allclose(got["q"].double(), exact, rtol=2**-7, atol=1e-2)


def test_low_rank_shape_mismatch_refused(tmp_path, monkeypatch):
    base = random_tensors({"q": ((16, 8), torch.float32)}, 60)
    save_file(base, tmp_path / "base.safetensors")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # read by the patched adapter_deltas only
    left, right = _factors(8, 16, 2, 61)
    monkeypatch.setattr(lora, "is_adapter_dir", lambda path: Path(path) == adapter)
    monkeypatch.setattr(
        lora, "adapter_deltas", lambda path, shapes: {"q": lora.LowRankDelta(left, right, 1.0)}
    )
    with pytest.raises(
        CheckpointError, match=r"delta of 'q' is 8x16 but the base tensor has shape \[16, 8\]"
    ):
        negate(tmp_path / "base.safetensors", adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_replaced_tensor_of_another_float_dtype(tmp_path, monkeypatch):
    """A modules_to_save tensor stored in fp32 on a bf16 base is a dense term like any other
    (the engine converts it); its shape must still match, and non-float dtypes must be equal."""
    base = random_tensors({"head": ((7, 5), torch.bfloat16), "ids": ((3,), torch.int64)}, 100)
    save_file(base, tmp_path / "base.safetensors")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # read by the patched adapter_deltas only
    tuned = perturb({"head": base["head"].float()}, 101)["head"]
    assert tuned.dtype == torch.float32 and not torch.equal(tuned.bfloat16(), base["head"])
    stored = {
        "head": tuned,
        "short": tuned[:6].clone(),
        "as_int": torch.zeros(7, 5, dtype=torch.int16),
        "ids_f32": torch.zeros(3),
    }
    save_file(stored, adapter / "adapter_model.safetensors")
    weights = str(adapter / "adapter_model.safetensors")
    deltas: dict[str, lora.ReplacedTensor] = {}
    monkeypatch.setattr(lora, "is_adapter_dir", lambda path: Path(path) == adapter)
    monkeypatch.setattr(lora, "adapter_deltas", lambda path, shapes: deltas)

    deltas["head"] = lora.ReplacedTensor(weights, "head")
    out = negate(tmp_path / "base.safetensors", adapter, tmp_path / "out", 0.5)
    got = load_file(out / "model.safetensors")
    assert_bitwise_equal(got, combine_reference(base, [(-0.5, {"head": tuned})]))
    assert got["head"].dtype == torch.bfloat16

    refusals = {
        ("head", "short"): r"tensor 'head' has shape \[6, 5\] but the base .* has \[7, 5\]",
        ("head", "as_int"): r"tensor 'head' has dtype I16 but the base .* has BF16",
        ("ids", "ids_f32"): r"tensor 'ids' has dtype F32 but the base .* has I64",
    }
    for (name, key), pattern in refusals.items():
        deltas.clear()
        deltas[name] = lora.ReplacedTensor(weights, key)
        with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: " + pattern):
            negate(tmp_path / "base.safetensors", adapter, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()


def test_native_low_rank_term_rejects_bad_factors(tmp_path):
    base = random_tensors({"q": ((4, 6), torch.float32)}, 70)
    save_file(base, tmp_path / "base.safetensors")
    header = _C.read_header(str(tmp_path / "base.safetensors"))
    _, _, _, begin, _ = header["tensors"][0]
    left, right = _factors(4, 5, 2, 71)  # right has 5 columns, the tensor 6
    with pytest.raises(CheckpointError, match=r'tensor "q": low-rank factors .* do not multiply'):
        _C.Job(
            name="q",
            numel=24,
            cols=6,
            base_input=0,
            base_offset=header["data_start"] + begin,
            base_dtype="F32",
            out_dtype="F32",
            out_offset=0,
            terms=[_C.LowRankTerm(weight=1.0, left=left, right=right)],
        )
    assert issubclass(_C.EngineError, CheckpointError)


def test_side_files_come_only_from_a_model_directory(tmp_path):
    base = random_tensors({"w": ((5, 3), torch.float32)}, 80)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file(base, model_dir / "model.safetensors")
    (model_dir / "config.json").write_text("{}")
    (model_dir / "pytorch_model.bin").write_bytes(b"stale weights")
    save_file(perturb(base, 81), tmp_path / "tuned.safetensors")
    (tmp_path / "notes.txt").write_text("unrelated")
    # the base's model.safetensors file: its directory's config is copied, other weights not
    out = negate(model_dir / "model.safetensors", tmp_path / "tuned.safetensors", tmp_path / "a")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # any other file: nothing from beside it
    out = negate(tmp_path / "tuned.safetensors", model_dir, tmp_path / "b")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


ISA_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from sku_fast.engine import adapter as lora
from sku_fast.engine.arithmetic import negate
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
left = rng.standard_normal((301, 5), dtype=np.float32)
right = rng.standard_normal((5, 211), dtype=np.float32)
lora.is_adapter_dir = lambda path: Path(path).name == "adapter"
lora.adapter_deltas = lambda path, shapes: {"lr": lora.LowRankDelta(left, right, 0.5)}
negate(root / "base.safetensors", root / "tuned.safetensors", root / ("dense-" + sys.argv[2]))
negate(root / "base.safetensors", root / "adapter", root / ("lora-" + sys.argv[2]))
"""


@pytest.mark.parametrize("isa", ["sse2", "avx2", "native"])
def test_every_vector_variant_matches_the_reference(tmp_path, isa):
    """The engine picks AVX-512/AVX2/portable loops at run time; SKU_FAST_ISA forces a lower
    one, so each variant is checked on any machine that has it (a cap above the machine's
    level runs the best available)."""
    spec = {
        "bf16": ((517, 263), torch.bfloat16),
        "f16": ((1003,), torch.float16),
        "f32": ((77, 3), torch.float32),
        "lr": ((301, 211), torch.bfloat16),
    }
    base = random_tensors(spec, seed=90)
    tuned = perturb(base, 91)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    env = dict(os.environ)
    env.pop("SKU_FAST_ISA", None)
    if isa != "native":
        env["SKU_FAST_ISA"] = isa
    subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(tmp_path), isa], env=env, check=True)
    got = load_file(tmp_path / f"dense-{isa}" / "model.safetensors")
    assert_bitwise_equal(got, combine_reference(base, [(-1.0, tuned)]))
    rng = np.random.default_rng(0)
    left = rng.standard_normal((301, 5), dtype=np.float32)
    right = rng.standard_normal((5, 211), dtype=np.float32)
    got = load_file(tmp_path / f"lora-{isa}" / "model.safetensors")
    ref = combine_reference(base, [(-0.5, {"lr": (left, right)})])
    assert_bitwise_equal(got, ref)


def test_native_jobs_are_typed_and_readable():
    left = np.ones((4, 2), dtype=np.float64)  # converted to float32
    right = np.ones((2, 6), dtype=np.float32)
    dense = _C.DenseTerm(weight=-1.0, input=1, offset=128, dtype="BF16")
    low_rank = _C.LowRankTerm(weight=0.5, left=left, right=right)
    job = _C.Job(
        name="q",
        numel=24,
        cols=6,
        base_input=0,
        base_offset=64,
        base_dtype="BF16",
        out_dtype="F32",
        out_offset=8,
        terms=[dense, low_rank],
    )
    assert repr(dense) == "DenseTerm(weight=-1.0, input=1, offset=128, dtype='BF16')"
    assert repr(low_rank) == "LowRankTerm(weight=0.5, left=float32[4, 2], right=float32[2, 6])"
    assert repr(job) == (
        "Job(name='q', numel=24, cols=6, base_input=0, base_offset=64, base_dtype='BF16', "
        "out_dtype='F32', out_offset=8, terms=[" + repr(dense) + ", " + repr(low_rank) + "])"
    )
    assert (job.name, job.out_dtype, len(job.terms)) == ("q", "F32", 2)
    assert low_rank.left.dtype == np.float32
    with pytest.raises(ValueError, match="unknown dtype 'F12'"):
        _C.DenseTerm(weight=1.0, input=0, offset=0, dtype="F12")
    with pytest.raises(TypeError):
        _C.DenseTerm(1.0, 0, 0, "F32")  # keywords only
    with pytest.raises(TypeError, match="jobs must be _C.Job objects, got <class 'tuple'>"):
        _C.combine("/nonexistent/x", b"", [], [("q", 24)], 1, None)


@pytest.fixture
def set_vector_level():
    """_C.set_vector_level for one test; the level in effect before is restored after."""
    before = _C.vector_level()
    yield _C.set_vector_level
    _C.set_vector_level(before)


def test_every_vector_level_writes_the_portable_bytes(tmp_path, monkeypatch, set_vector_level):
    """In process: each level this CPU has (0 portable, 1 AVX2, 2 AVX-512) writes the same
    bytes for the fused one-model path, the general path (an output dtype change) and LoRA."""
    spec = {
        "bf16": ((517, 263), torch.bfloat16),
        "f16": ((1003,), torch.float16),
        "f32": ((77, 3), torch.float32),
        "lr": ((301, 211), torch.bfloat16),
    }
    base = random_tensors(spec, seed=92)
    save_file(base, tmp_path / "base.safetensors")
    save_file(perturb(base, 93), tmp_path / "tuned.safetensors")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    left, right = _factors(301, 211, 5, 94)
    monkeypatch.setattr(lora, "is_adapter_dir", lambda path: Path(path) == adapter)
    monkeypatch.setattr(
        lora, "adapter_deltas", lambda path, shapes: {"lr": lora.LowRankDelta(left, right, 0.5)}
    )
    outputs = {}
    for level in (0, 1, 2):
        if set_vector_level(level) != level:
            continue  # this CPU lacks it
        runs = [
            negate(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "d"),
            negate(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "g",
                   dtype="f32"),
            negate(tmp_path / "base.safetensors", adapter, tmp_path / "l"),
        ]  # fmt: skip
        outputs[level] = [(out / "model.safetensors").read_bytes() for out in runs]
        for out in runs:
            shutil.rmtree(out)
    assert 0 in outputs
    for level, got in outputs.items():
        assert got == outputs[0], f"level {level} differs from the portable loops"
