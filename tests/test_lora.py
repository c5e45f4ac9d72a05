"""LoRA adapters against PEFT's own merge_and_unload, on tiny random models.

Each case builds a small model, wraps it with PEFT, randomises every trainable parameter (PEFT
initialises lora_B to zero, which would make every delta vanish), saves the base with
save_pretrained and the adapter with PEFT's save_pretrained, and keeps PEFT's merged weights as
the oracle.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import llama_config
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from sku_fast.engine import adapter_negation
from sku_fast.engine.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LowRankDelta,
    ReplacedTensor,
    adapter_deltas,
    is_adapter_dir,
)
from sku_fast.engine.adapter_negation import negate_lora
from sku_fast.errors import CheckpointError

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama() -> LlamaForCausalLM:
    config = llama_config(
        hidden_size=48, intermediate_size=72, vocab_size=67, tie_word_embeddings=False
    )
    return LlamaForCausalLM(config)


def _gpt2() -> GPT2LMHeadModel:
    # GPT-2's bos/eos 50256 would lie outside the tiny vocabulary
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=67,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


@dataclass(frozen=True)
class Case:
    base_dir: Path
    adapter_dir: Path  # what the user passes (may be the parent of a named adapter's folder)
    base: dict[str, torch.Tensor]  # θ_o, as saved
    merged: dict[str, torch.Tensor]  # PEFT's merge_and_unload, restricted to the saved names
    expected: set[str]  # base tensor names the adapter changes


def _build(root: Path, make_model, lora: LoraConfig, adapter_name: str = "default", seed=0) -> Case:
    torch.manual_seed(seed)
    model = make_model()
    base_dir, adapter_root = root / "base", root / "adapter"
    model.save_pretrained(base_dir)
    base = load_file(base_dir / "model.safetensors")
    peft_model = get_peft_model(model, lora, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(adapter_root)
    merged = peft_model.merge_and_unload().state_dict()
    merged = {k: merged[k].detach().clone() for k in base}
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    return Case(base_dir, adapter_root, base, merged, changed)


def _shapes(case: Case) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in case.base.items()}


def _peft_merge(base_dir: Path, adapter_dir: Path, make_model) -> dict[str, torch.Tensor]:
    model = type(make_model()).from_pretrained(base_dir)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()
    return {k: v.detach() for k, v in merged.items()}


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


# One case per supported kind: (model, LoraConfig kwargs, adapter name, names of changed tensors)
CASES = {
    "plain_q_v": (
        _llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "default",
        {f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")},
    ),
    "fan_in_fan_out": (  # GPT-2 Conv1D: c_attn [32, 96], c_fc [32, 128], square c_proj [32, 32]
        _gpt2,
        dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        "default",
        {
            f"transformer.h.{i}.{m}.weight"
            for i in (0, 1)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        },
    ),
    "use_rslora_named_adapter": (
        _llama,
        dict(r=8, lora_alpha=16, use_rslora=True, target_modules=LLAMA_LINEAR),
        "harm",
        {
            f"model.layers.{i}.{m}.weight"
            for i in (0, 1)
            for m in (
                *(f"self_attn.{p}" for p in LLAMA_LINEAR[:4]),
                *(f"mlp.{p}" for p in LLAMA_LINEAR[4:]),
            )
        },
    ),
    "rank_and_alpha_pattern": (
        _llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 6},
            # the first matching pattern wins, as in PEFT: layer 1's v_proj gets 7, layer 0's 3
            alpha_pattern={r"layers\.1\.self_attn\.v_proj": 7, "v_proj": 3},
        ),
        "default",
        {
            f"model.layers.{i}.{m}.weight"
            for i in (0, 1)
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        },
    ),
    "embedding": (
        _llama,
        dict(r=4, lora_alpha=12, target_modules=["embed_tokens", "q_proj"]),
        "default",
        {"model.embed_tokens.weight"}
        | {f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)},
    ),
    "trained_biases": (  # bias="all": every bias is stored whole and replaces the base's
        _gpt2,
        dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all"),
        "default",
        {f"transformer.h.{i}.attn.c_attn.weight" for i in (0, 1)}
        | {
            f"transformer.h.{i}.{m}.bias"
            for i in (0, 1)
            for m in ("attn.c_attn", "attn.c_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
        }
        | {"transformer.ln_f.bias"},
    ),
    "modules_to_save": (
        _llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "default",
        {"lm_head.weight"} | {f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)},
    ),
}


NEEDS_BASE = {"modules_to_save", "trained_biases"}  # adapters with tensors stored whole


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> tuple[str, Case]:
    make_model, kwargs, adapter_name, expected = CASES[request.param]
    built = _build(
        tmp_path_factory.mktemp(request.param), make_model, LoraConfig(**kwargs), adapter_name
    )
    assert built.expected == expected  # the randomised adapter really changes exactly these
    return request.param, built


def test_deltas_match_peft_merge(case):
    """(a) scaling·left@right == merged − base for every adapted tensor, others untouched."""
    name, c = case
    deltas = adapter_deltas(c.adapter_dir, _shapes(c))
    assert set(deltas) == c.expected
    for key, base in c.base.items():
        d = deltas.get(key)
        if isinstance(d, LowRankDelta):
            assert d.left.dtype == d.right.dtype == np.float32
            assert d.left.flags.c_contiguous and d.right.flags.c_contiguous
            dense = (
                d.scaling * torch.from_numpy(d.left).double() @ torch.from_numpy(d.right).double()
            )
            assert dense.shape == base.shape, key
            torch.testing.assert_close(
                (c.merged[key].double() - base.double()), dense, rtol=0, atol=2e-6, msg=key
            )
        elif isinstance(d, ReplacedTensor):
            stored = load_file(d.path)[d.name]
            assert torch.equal(stored, c.merged[key]), key
        else:
            assert torch.equal(base, c.merged[key]), key


def test_scalings_follow_config(tmp_path_factory):
    """Scalings by hand: rank/alpha patterns (first match wins) and rsLoRA's alpha/sqrt(r)."""
    make_model, kwargs, _, _ = CASES["rank_and_alpha_pattern"]
    c = _build(tmp_path_factory.mktemp("scal"), make_model, LoraConfig(**kwargs))
    s = {k: v.scaling for k, v in adapter_deltas(c.adapter_dir, _shapes(c)).items()}
    layer = "model.layers.{}.{}.weight".format
    assert s[layer(0, "self_attn.q_proj")] == 8 / 2
    assert s[layer(1, "self_attn.q_proj")] == 8 / 4
    assert s[layer(0, "self_attn.v_proj")] == 3 / 4
    assert s[layer(1, "self_attn.v_proj")] == 7 / 4
    assert s[layer(0, "mlp.down_proj")] == s[layer(1, "mlp.down_proj")] == 8 / 6

    make_model, kwargs, name, _ = CASES["use_rslora_named_adapter"]
    c = _build(tmp_path_factory.mktemp("rs"), make_model, LoraConfig(**kwargs), name)
    assert {v.scaling for v in adapter_deltas(c.adapter_dir, _shapes(c)).values()} == {
        16 / math.sqrt(8)
    }


def test_named_adapter_folder(case):
    """PEFT saves an adapter not named "default" in a subfolder: the parent and it both work."""
    name, c = case
    sub = [d for d in c.adapter_dir.iterdir() if d.is_dir()]
    assert is_adapter_dir(c.adapter_dir) and not is_adapter_dir(c.base_dir)
    if name == "use_rslora_named_adapter":
        assert [d.name for d in sub] == ["harm"] and not (c.adapter_dir / ADAPTER_CONFIG).exists()
        direct = adapter_deltas(sub[0], _shapes(c))
        via_parent = adapter_deltas(c.adapter_dir, _shapes(c))
        assert set(direct) == set(via_parent) == c.expected
        for k in direct:
            assert np.array_equal(direct[k].left, via_parent[k].left)


@pytest.mark.parametrize("scale", [1.0, 0.75])
def test_negate_lora_loads_in_peft_and_merges_to_negation(case, tmp_path, scale):
    """(b) the negated adapter, loaded with PEFT and merged, equals θ_o − λ·(merged − θ_o)."""
    name, c = case
    before = _tree_digest(c.adapter_dir)
    make_model = CASES[name][0]
    base_arg = c.base_dir if name in NEEDS_BASE else None
    out = negate_lora(c.adapter_dir, tmp_path / "neg", scale=scale, base=base_arg)
    assert out == tmp_path / "neg"
    assert _tree_digest(c.adapter_dir) == before  # input untouched
    got = _peft_merge(c.base_dir, out, make_model)
    for key, base in c.base.items():
        want = base - scale * (c.merged[key] - base)
        torch.testing.assert_close(got[key], want, rtol=0, atol=3e-6, msg=key)
    # everything but lora_B / modules_to_save tensors is byte-identical to the input
    src, dst = load_file(_weights(c.adapter_dir)), load_file(out / ADAPTER_WEIGHTS)
    deltas = adapter_deltas(c.adapter_dir, _shapes(c)).values()
    replaced = {d.name for d in deltas if isinstance(d, ReplacedTensor)}
    assert bool(replaced) == (name in NEEDS_BASE)
    assert src.keys() == dst.keys()
    for key in src:
        if ".lora_B" in key or ".lora_embedding_B" in key:
            assert torch.equal(dst[key], src[key] * -scale), key
        elif key in replaced:
            assert not torch.equal(dst[key], src[key])
        else:
            assert torch.equal(dst[key], src[key]), key
    assert json.loads((out / ADAPTER_CONFIG).read_text()) == json.loads(
        (_weights(c.adapter_dir).parent / ADAPTER_CONFIG).read_text()
    )


def _weights(adapter_dir: Path) -> Path:
    found = sorted(adapter_dir.rglob(ADAPTER_WEIGHTS))
    assert len(found) == 1
    return found[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Case:
    make_model, kwargs, _, _ = CASES["modules_to_save"]
    return _build(tmp_path_factory.mktemp("plain"), make_model, LoraConfig(**kwargs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapter_rounds_once(tmp_path, plain, dtype):
    """bf16/f16 adapters: deltas are the stored values exactly; −λ·B is rounded once (RNE)."""
    adapter = tmp_path / "half"
    adapter.mkdir()
    (adapter / ADAPTER_CONFIG).write_bytes((plain.adapter_dir / ADAPTER_CONFIG).read_bytes())
    tensors = {k: v.to(dtype) for k, v in load_file(plain.adapter_dir / ADAPTER_WEIGHTS).items()}
    save_file(tensors, adapter / ADAPTER_WEIGHTS)
    key_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    key_b = key_a.replace("lora_A", "lora_B")
    d = adapter_deltas(adapter, _shapes(plain))["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(torch.from_numpy(d.left), tensors[key_b].float())
    assert torch.equal(torch.from_numpy(d.right), tensors[key_a].float())

    scale = 0.3  # not a power of two: every element needs rounding
    out = negate_lora(adapter, tmp_path / "neg", scale=scale, base=plain.base_dir)
    neg = load_file(out / ADAPTER_WEIGHTS)
    assert neg[key_b].dtype == dtype
    want = (tensors[key_b].float() * -scale).to(dtype)
    assert torch.equal(neg[key_b].view(torch.int16), want.view(torch.int16))
    lm = "base_model.model.lm_head.weight"
    theta = plain.base["lm_head.weight"]
    want = (theta - scale * (tensors[lm].float() - theta)).to(dtype)
    assert torch.equal(neg[lm].view(torch.int16), want.view(torch.int16))


# ----------------------------------------------------------------------------- refusals


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))


def _edit_weights(adapter: Path, edit) -> None:
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, adapter / ADAPTER_WEIGHTS)


def test_dora_refused(tmp_path):
    torch.manual_seed(0)
    peft_model = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    peft_model.save_pretrained(tmp_path / "dora")
    shapes = {k: tuple(v.shape) for k, v in _llama().state_dict().items()}
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: DoRA adapter \(use_dora"):
        adapter_deltas(tmp_path / "dora", shapes)
    with pytest.raises(CheckpointError, match="DoRA"):
        negate_lora(tmp_path / "dora", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a config that hides it still fails on the magnitude vector, naming the tensor
    _edit_config(tmp_path / "dora", use_dora=False)
    with pytest.raises(CheckpointError, match=r"'base_model\.model\..*lora_magnitude_vector.*DoRA"):
        adapter_deltas(tmp_path / "dora", shapes)


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = A0.replace("lora_A", "lora_B")


def _bin_only(a: Path) -> None:
    (a / ADAPTER_WEIGHTS).rename(a / "adapter_model.bin")


BAD_ADAPTERS = {
    "bin_only": (_bin_only, r"adapter_model\.bin: pickled \.bin adapters are not read"),
    "bad_json": (
        lambda a: (a / ADAPTER_CONFIG).write_text("{r: 4"),
        r"adapter_config\.json: unreadable adapter config",
    ),
    "not_lora": (lambda a: _edit_config(a, peft_type="IA3"), r"peft_type is 'IA3'"),
    "zero_rank": (lambda a: _edit_config(a, r=0), r"r must be a positive integer, got 0"),
    "rank_mismatch": (
        lambda a: _edit_config(a, r=5),
        r"q_proj': rank 5 from the config .* A is \[4, 48\] and B is \[48, 4\]",
    ),
    "pissa": (lambda a: _edit_config(a, init_lora_weights="pissa"), r"rewrites the base weights"),
    "missing_b": (
        lambda a: _edit_weights(a, lambda t: t.pop(B0)),
        r"layers\.0\.self_attn\.q_proj' has no lora_B",
    ),
    "lora_bias": (
        lambda a: _edit_weights(
            a, lambda t: t.update({B0[: -len("weight")] + "bias": torch.ones(48)})
        ),
        r"lora_B\.bias': unsupported adapter tensor kind",
    ),
    "conv_adapter": (
        lambda a: _edit_weights(a, lambda t: t.update({A0: t[A0][:, :, None, None]})),
        r"lora_A\.weight': F32 \[4, 48, 1, 1\]; expected a 2-D float matrix",
    ),
    "truncated": (
        lambda a: (a / ADAPTER_WEIGHTS).write_bytes((a / ADAPTER_WEIGHTS).read_bytes()[:-3]),
        r"adapter_model\.safetensors: tensors end at data byte \d+ but the data section has \d+ "
        r"bytes \(file truncated\)",
    ),
    "lfs_pointer": (
        lambda a: (a / ADAPTER_WEIGHTS).write_text("version https://git-lfs.github.com/spec/v1\n"),
        r"adapter_model\.safetensors: is a Git LFS pointer file, not the weights",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_ADAPTERS))
def test_bad_adapters_refused(tmp_path, plain, kind):
    mutate, message = BAD_ADAPTERS[kind]
    adapter = _copy_adapter(plain.adapter_dir, tmp_path / "adapter")
    mutate(adapter)
    before = _tree_digest(adapter)
    with pytest.raises(CheckpointError, match=message):
        adapter_deltas(adapter, _shapes(plain))
    with pytest.raises(CheckpointError, match=message):
        negate_lora(adapter, tmp_path / "out", base=plain.base_dir)
    assert not (tmp_path / "out").exists()
    assert _tree_digest(adapter) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind


def test_base_mismatch_refused(plain):
    shapes = _shapes(plain)
    q0 = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(CheckpointError, match=rf"'{A0}': the base checkpoint has no tensor '{q0}'"):
        adapter_deltas(plain.adapter_dir, {k: v for k, v in shapes.items() if k != q0})
    with pytest.raises(
        CheckpointError, match=rf"give a \[48, 48\] delta but base tensor '{q0}' is \[48, 50\]"
    ):
        adapter_deltas(plain.adapter_dir, shapes | {q0: (48, 50)})
    with pytest.raises(
        CheckpointError,
        match=r"lm_head\.weight' is \[67, 48\] but base tensor 'lm_head\.weight' is \[68, 48\]",
    ):
        adapter_deltas(plain.adapter_dir, shapes | {"lm_head.weight": (68, 48)})


def test_modules_to_save_needs_base(tmp_path, plain):
    """Stored-whole tensors need the base: refused without it; a file, a directory and a sharded
    directory all give the same bytes."""
    with pytest.raises(
        CheckpointError,
        match=r"whole \(modules_to_save or trained biases: lm_head\.weight\).*pass base=PATH",
    ):
        negate_lora(plain.adapter_dir, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"adapter: the base must be a full checkpoint, not"):
        negate_lora(plain.adapter_dir, tmp_path / "out", base=plain.adapter_dir)
    assert list(tmp_path.iterdir()) == []

    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(plain.base_dir).save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    outputs = [
        negate_lora(plain.adapter_dir, tmp_path / f"out{i}", scale=0.5, base=base)
        for i, base in enumerate([plain.base_dir, plain.base_dir / "model.safetensors", sharded])
    ]
    digests = [_tree_digest(out) for out in outputs]
    assert digests[0] == digests[1] == digests[2]


def test_output_paths(tmp_path, plain):
    adapter = _copy_adapter(plain.adapter_dir, tmp_path / "adapter")
    before = _tree_digest(adapter)
    kw = dict(base=plain.base_dir, overwrite=True)
    for bad in (adapter, adapter / "neg", tmp_path, plain.base_dir / "x"):
        pattern = r"output .* (is the input .* or inside it|contains the input)"
        with pytest.raises(CheckpointError, match=pattern):
            negate_lora(adapter, bad, **kw)
    assert _tree_digest(adapter) == before

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(
        CheckpointError, match=r"output .*out already exists \(use --overwrite or overwrite=True"
    ):
        negate_lora(adapter, out, base=plain.base_dir)
    assert (out / "keep").read_text() == "old"
    negate_lora(adapter, out, **kw)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in adapter.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]
    assert _tree_digest(adapter) == before

    # an adapter in a named subfolder: the folder the user passed is an input too
    named = tmp_path / "named"
    named.mkdir()
    _copy_adapter(adapter, named / "harm")
    with pytest.raises(CheckpointError, match=r"output .*named/other is the input .*named or"):
        negate_lora(named, named / "other", **kw)
    assert sorted(p.name for p in named.iterdir()) == ["harm"]


def test_failed_write_leaves_nothing(tmp_path, plain, monkeypatch):

    def disk_full(path, *args):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_negation, "_write_safetensors", disk_full)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(
        CheckpointError, match=r"out: cannot write the output: No space left on device"
    ):
        negate_lora(plain.adapter_dir, out, base=plain.base_dir, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep"]  # the previous output is still there


# ----------------------------------------------------------------------------- with the engine


@pytest.mark.parametrize("scale", [1.0, 0.75])
def test_engine_negate_with_adapter_matches_peft(case, tmp_path, scale):
    """negate(base, adapter) streams θ_o − λ·τ; it equals PEFT's merge of the negated adapter."""
    from sku_fast.engine.arithmetic import negate

    name, c = case
    before = _tree_digest(c.adapter_dir)
    out = negate(c.base_dir, c.adapter_dir, tmp_path / "out", scale=scale, threads=2)
    got = load_file(out / "model.safetensors")
    assert got.keys() == c.base.keys()
    for key, base in c.base.items():
        want = base - scale * (c.merged[key] - base)
        assert got[key].dtype == base.dtype
        torch.testing.assert_close(got[key], want, rtol=0, atol=3e-6, msg=key)
    assert _tree_digest(c.adapter_dir) == before

    # the negated adapter merged by PEFT and the engine's output agree
    base_arg = c.base_dir if name in NEEDS_BASE else None
    negated = negate_lora(c.adapter_dir, tmp_path / "neg", scale=scale, base=base_arg)
    peft_merged = _peft_merge(c.base_dir, negated, CASES[name][0])
    for key in c.base:
        torch.testing.assert_close(got[key], peft_merged[key], rtol=0, atol=3e-6, msg=key)
