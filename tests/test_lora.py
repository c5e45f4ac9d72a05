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
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
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


def _build(
    root: Path,
    make_model,
    lora: LoraConfig,
    adapter_name: str = "default",
    seed=0,
    config_edits: dict | None = None,
) -> Case:
    """The oracle is PEFT's merge of the files as saved, loaded from disk: what the files mean
    to PEFT. (It differs from the in-memory merge when patterns overlap: PEFT saves
    rank_pattern / alpha_pattern with sorted keys, and the first matching key wins.) With
    `config_edits`, the saved adapter_config.json is edited afterwards, as by another tool or
    by hand."""
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
    in_memory = peft_model.merge_and_unload().state_dict()
    # PEFT saves an adapter not named "default" in a subfolder, and loads it from there
    saved = adapter_root if adapter_name == "default" else adapter_root / adapter_name
    if config_edits:
        (config_path,) = adapter_root.rglob(ADAPTER_CONFIG)
        config = json.loads(config_path.read_text())
        assert all(config.get(k) != v for k, v in config_edits.items())  # really an edit
        config_path.write_text(json.dumps(config | config_edits))
        with pytest.warns(UserWarning, match="fan_in_fan_out is set to"):  # PEFT overrides it
            merged = _peft_merge(base_dir, saved, make_model)
        for k in base:  # PEFT ignores the edited flag: its merge is the one before the edit
            assert torch.equal(merged[k], in_memory[k]), k
    else:
        merged = _peft_merge(base_dir, saved, make_model)
    merged = {k: merged[k].clone() for k in base}
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
    # fan_in_fan_out set on Llama's nn.Linear layers (square q_proj/o_proj [48, 48]): PEFT
    # warns and merges B·A untransposed; the engine reads "llama" from the base's config.json
    "llama_fan_in_fan_out_set_wrongly": (
        _llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"]),
        "default",
        {
            f"model.layers.{i}.self_attn.{m}.weight"
            for i in (0, 1)
            for m in ("q_proj", "k_proj", "o_proj")
        },
        {"fan_in_fan_out": True},
    ),
    # fan_in_fan_out cleared on GPT-2's Conv1D layers: PEFT warns and transposes anyway
    "gpt2_fan_in_fan_out_cleared": (
        _gpt2,
        dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        "default",
        {
            f"transformer.h.{i}.{m}.weight"
            for i in (0, 1)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
        },
        {"fan_in_fan_out": False},
    ),
    "gpt2_rslora_with_patterns": (
        _gpt2,
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
            rank_pattern={r"h\.0\.attn\.c_attn": 2, "c_fc": 6},
            alpha_pattern={"mlp.c_proj": 3, "c_proj": 11.5},
        ),
        "default",
        {
            f"transformer.h.{i}.{m}.weight"
            for i in (0, 1)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        },
    ),
}


NEEDS_BASE = {"modules_to_save", "trained_biases"}  # adapters with tensors stored whole


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> tuple[str, Case]:
    make_model, kwargs, adapter_name, expected, *edits = CASES[request.param]
    built = _build(
        tmp_path_factory.mktemp(request.param),
        make_model,
        LoraConfig(**kwargs),
        adapter_name,
        config_edits=edits[0] if edits else None,
    )
    assert built.expected == expected  # the randomised adapter really changes exactly these
    return request.param, built


def test_deltas_match_peft_merge(case):
    """(a) scaling·left@right == merged − base for every adapted tensor, others untouched."""
    name, c = case
    deltas = adapter_deltas(c.adapter_dir, c.base_dir)
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
    s = {k: v.scaling for k, v in adapter_deltas(c.adapter_dir, c.base_dir).items()}
    layer = "model.layers.{}.{}.weight".format
    assert s[layer(0, "self_attn.q_proj")] == 8 / 2
    assert s[layer(1, "self_attn.q_proj")] == 8 / 4
    assert s[layer(0, "self_attn.v_proj")] == 3 / 4
    assert s[layer(1, "self_attn.v_proj")] == 7 / 4
    assert s[layer(0, "mlp.down_proj")] == s[layer(1, "mlp.down_proj")] == 8 / 6

    make_model, kwargs, name, _ = CASES["use_rslora_named_adapter"]
    c = _build(tmp_path_factory.mktemp("rs"), make_model, LoraConfig(**kwargs), name)
    assert {v.scaling for v in adapter_deltas(c.adapter_dir, c.base_dir).values()} == {
        16 / math.sqrt(8)
    }


def test_named_adapter_folder(case):
    """PEFT saves an adapter not named "default" in a subfolder: the parent and it both work."""
    name, c = case
    sub = [d for d in c.adapter_dir.iterdir() if d.is_dir()]
    assert is_adapter_dir(c.adapter_dir) and not is_adapter_dir(c.base_dir)
    if name == "use_rslora_named_adapter":
        assert [d.name for d in sub] == ["harm"] and not (c.adapter_dir / ADAPTER_CONFIG).exists()
        direct = adapter_deltas(sub[0], c.base_dir)
        via_parent = adapter_deltas(c.adapter_dir, c.base_dir)
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
    deltas = adapter_deltas(c.adapter_dir, c.base_dir).values()
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


def _config_text(a: Path, old: str, new: str) -> None:
    """Edit adapter_config.json as text (for what json.dumps would not write)."""
    text = (a / ADAPTER_CONFIG).read_text()
    assert old in text
    (a / ADAPTER_CONFIG).write_text(text.replace(old, new, 1))


def _replace(path: Path, make) -> None:
    path.unlink()
    make(path)


def _without(key: str):
    def edit(a: Path) -> None:
        config = json.loads((a / ADAPTER_CONFIG).read_text())
        del config[key]
        (a / ADAPTER_CONFIG).write_text(json.dumps(config))

    return edit


# adapter_config.json values refused where they enter: (field, value, message after the path)
BAD_CONFIG_VALUES = {
    "alpha_nan": ("lora_alpha", float("nan"), r"lora_alpha is NaN: not a finite number"),
    "alpha_infinity": ("lora_alpha", float("inf"), r"lora_alpha is Infinity: not a finite"),
    "alpha_minus_infinity": ("lora_alpha", -float("inf"), r"lora_alpha is -Infinity: not a"),
    "alpha_1e39": (
        "lora_alpha",
        1e39,
        r"lora_alpha must be positive and at most 1e\+06, got 1e\+39: LoRA alphas are small",
    ),
    "alpha_huge_int": ("lora_alpha", 10**400, r"lora_alpha must be positive and at most 1e\+06"),
    "alpha_zero": ("lora_alpha", 0, r"lora_alpha must be positive and at most 1e\+06, got 0"),
    "alpha_negative": ("lora_alpha", -8, r"lora_alpha must be positive .*, got -8"),
    "alpha_string": ("lora_alpha", "8", r"lora_alpha must be a number, got '8'"),
    "alpha_bool": ("lora_alpha", True, r"lora_alpha must be a number, got True"),
    "alpha_null": ("lora_alpha", None, r"lora_alpha must be a number, got None"),
    "r_fraction": ("r", 4.5, r"r must be a positive integer, got 4\.5"),
    "r_float": ("r", 4.0, r"r must be a positive integer, got 4\.0"),
    "r_negative": ("r", -4, r"r must be a positive integer, got -4"),
    "r_string": ("r", "4", r"r must be a positive integer, got '4'"),
    "r_bool": ("r", True, r"r must be a positive integer, got True"),
    "rank_pattern_fraction": (
        "rank_pattern",
        {"q_proj": 4.5},
        r"rank_pattern\['q_proj'\] must be a positive integer, got 4\.5",
    ),
    "rank_pattern_zero": (
        "rank_pattern",
        {"q_proj": 0},
        r"rank_pattern\['q_proj'\] must be a positive integer, got 0",
    ),
    "rank_pattern_nan": (
        "rank_pattern",
        {"q_proj": float("nan")},
        r"rank_pattern\['q_proj'\] is NaN",
    ),
    "rank_pattern_list": ("rank_pattern", ["q_proj"], r"rank_pattern must map module patterns"),
    "rank_pattern_false": ("rank_pattern", False, r"rank_pattern must map module patterns"),
    "rank_pattern_bad_regex": (
        "rank_pattern",
        {"q_proj(": 4},
        r"rank_pattern pattern 'q_proj\(' is not a valid regular expression",
    ),
    "alpha_pattern_nan": (
        "alpha_pattern",
        {"q_proj": float("nan")},
        r"alpha_pattern\['q_proj'\] is NaN: not a finite number",
    ),
    "alpha_pattern_negative": (
        "alpha_pattern",
        {"q_proj": -1},
        r"alpha_pattern\['q_proj'\] must be positive and at most 1e\+06, got -1",
    ),
    "alpha_pattern_1e39": ("alpha_pattern", {"q_proj": 1e39}, r"alpha_pattern\['q_proj'\] must"),
    "alpha_pattern_string": (
        "alpha_pattern",
        {"q_proj": "x"},
        r"alpha_pattern\['q_proj'\] must be a number, got 'x'",
    ),
    "nan_in_an_unread_field": ("lora_dropout", float("nan"), r"lora_dropout is NaN"),
    "nan_deep_inside": (
        "eva_config",
        {"a": [1, float("inf")]},
        r"eva_config\['a'\]\[1\] is Infinity",
    ),
    "fan_in_fan_out_string": (
        "fan_in_fan_out",
        "false",
        r"fan_in_fan_out must be true or false, got 'false'",
    ),
    "use_rslora_number": ("use_rslora", 1, r"use_rslora must be true or false, got 1"),
    "use_dora_string": ("use_dora", "no", r"use_dora must be true or false, got 'no'"),
    "peft_type_null": ("peft_type", None, r"peft_type is None; only LoRA adapters"),
    "init_number": ("init_lora_weights", 3, r"init_lora_weights must be true, false or the name"),
    "qalora": ("use_qalora", True, r"QA-LoRA adapter \(use_qalora=true\)"),
    "alora": ("alora_invocation_tokens", [1, 2], r"activated LoRA \(alora_invocation_tokens\)"),
    "velora": ("velora_config", {"r": 2}, r"VeLoRA adapter"),
}


def _set(field: str, value):
    return lambda a: _edit_config(a, **{field: value})


BAD_ADAPTERS = {
    "bin_only": (_bin_only, r"adapter_model\.bin: pickled \.bin adapters are not read"),
    "bad_json": (
        lambda a: (a / ADAPTER_CONFIG).write_text("{r: 4"),
        r"adapter_config\.json: invalid JSON: Expecting property name enclosed in double quotes "
        r"at line 1 column 2",
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
    **{
        kind: (_set(field, value), r"adapter_config\.json: " + message)
        for kind, (field, value, message) in BAD_CONFIG_VALUES.items()
    },
    "alpha_1e400_literal": (  # overflows to inf when parsed
        lambda a: _config_text(a, '"lora_alpha": 8', '"lora_alpha": 1e400'),
        r"adapter_config\.json: lora_alpha is 1e400: not a finite number",
    ),
    # ranks the tensors do not have: PEFT would fail to load the [4, 48] lora_A
    "r_huge": (
        _set("r", 10**30),
        r"adapter_model\.safetensors: module 'model\.layers\.0\.self_attn\.q_proj': rank "
        r"1000000000000000000000000000000 from the config",
    ),
    "rank_pattern_mismatch": (
        _set("rank_pattern", {r"layers\.0\.self_attn\.q_proj": 2}),
        r"adapter_model\.safetensors: module 'model\.layers\.0\.self_attn\.q_proj': rank 2 "
        r"from the config \(r / rank_pattern\) but A is \[4, 48\]",
    ),
    "alpha_missing": (_without("lora_alpha"), r"adapter_config\.json: lora_alpha is missing"),
    "r_missing": (_without("r"), r"adapter_config\.json: r is missing"),
    "duplicate_key": (
        lambda a: _config_text(a, '"r": 4', '"r": 4, "r": 8'),
        r"adapter_config\.json: duplicate key 'r'",
    ),
    "not_utf8": (
        lambda a: (a / ADAPTER_CONFIG).write_bytes(b'{"peft_type": "LORA\xff"}'),
        r"adapter_config\.json: not UTF-8 text \(invalid start byte at byte 19\)",
    ),
    "not_an_object": (
        lambda a: (a / ADAPTER_CONFIG).write_text("[1, 2]"),
        r"adapter_config\.json: adapter config is not a JSON object \(got list\)",
    ),
    "nested_too_deep": (
        lambda a: (a / ADAPTER_CONFIG).write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        r"adapter_config\.json: invalid JSON: maximum recursion depth exceeded",
    ),
    "config_too_large": (
        lambda a: (a / ADAPTER_CONFIG).write_text('{"x": "' + "a" * (17 << 20) + '"}'),
        r"adapter_config\.json: 17825801 bytes; an adapter config is a small JSON file",
    ),
    "config_is_a_directory": (
        lambda a: _replace(a / ADAPTER_CONFIG, Path.mkdir),
        r"adapter_config\.json: is a directory, expected a file \(the adapter config\)",
    ),
    "config_is_a_fifo": (
        lambda a: _replace(a / ADAPTER_CONFIG, os.mkfifo),
        r"adapter_config\.json: not a regular file \(a FIFO, device or socket\), expected a",
    ),
    "weights_are_a_directory": (
        lambda a: _replace(a / ADAPTER_WEIGHTS, Path.mkdir),
        r"adapter_model\.safetensors: is a directory, expected a file",
    ),
    "weights_are_a_fifo": (
        lambda a: _replace(a / ADAPTER_WEIGHTS, os.mkfifo),
        r"adapter_model\.safetensors: not a regular file \(a FIFO, device or socket\)",
    ),
    "weights_are_dev_zero": (
        lambda a: _replace(a / ADAPTER_WEIGHTS, lambda p: p.symlink_to("/dev/zero")),
        r"adapter_model\.safetensors: not a regular file \(a FIFO, device or socket\)",
    ),
    "no_tensors": (
        lambda a: (a / ADAPTER_WEIGHTS).write_bytes(b"\x02\0\0\0\0\0\0\0{}"),
        r"adapter_model\.safetensors: holds no tensors; not a LoRA adapter",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_ADAPTERS))
def test_bad_adapters_refused(tmp_path, plain, kind):
    mutate, message = BAD_ADAPTERS[kind]
    adapter = _copy_adapter(plain.adapter_dir, tmp_path / "adapter")
    mutate(adapter)
    before = _tree_digest(adapter)
    with pytest.raises(CheckpointError, match=message) as refused:
        adapter_deltas(adapter, _shapes(plain))
    assert str(refused.value).startswith(f"{adapter}/")  # names the file
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

    monkeypatch.setattr(adapter_negation._C, "combine", disk_full)
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


def test_engine_merge_is_peft_merge_to_fp32_rounding(case, tmp_path):
    """base + τ streamed by the engine equals PEFT's merge_and_unload of the saved files up to
    the rounding of two fp32 evaluations of the same sums: |Δ| ≤ 2·eps·(|W| + scaling·|B||A|)
    elementwise. A delta with the wrong orientation or scaling is off by O(|τ|)."""
    from sku_fast.engine.arithmetic import task_arithmetic

    _, c = case
    out = task_arithmetic(c.base_dir, [(c.adapter_dir, 1.0)], tmp_path / "out", threads=2)
    got = load_file(out / "model.safetensors")
    deltas = adapter_deltas(c.adapter_dir, c.base_dir)
    eps = torch.finfo(torch.float32).eps
    for key, want in c.merged.items():
        d = deltas.get(key)
        if isinstance(d, LowRankDelta):
            left, right = (torch.from_numpy(m).double().abs() for m in (d.left, d.right))
            bound = 2 * eps * (want.double().abs() + d.scaling * left @ right)
            assert ((got[key].double() - want.double()).abs() <= bound).all(), key
        elif key in c.expected:  # stored whole: base + 1·(tuned − base), two roundings
            base = c.base[key].double()
            bound = 2 * eps * (want.double().abs() + base.abs())
            assert ((got[key].double() - want.double()).abs() <= bound).all(), key
        else:
            assert torch.equal(got[key], want), key


def _base_variant(plain: Case, root: Path, **casts) -> Path:
    """A copy of the base model directory with some tensors cast to other dtypes."""
    root.mkdir()
    (root / "config.json").write_bytes((plain.base_dir / "config.json").read_bytes())
    tensors = {k: v.to(casts[k]) if k in casts else v for k, v in plain.base.items()}
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.mark.parametrize(
    "dtype, name",
    [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3")],
)
def test_delta_on_a_non_float_base_tensor_refused(tmp_path, plain, dtype, name):
    """An integer, bool or float8 base tensor cannot take a LoRA delta: refused, not dropped."""
    from sku_fast.engine.arithmetic import negate

    q0 = "model.layers.0.self_attn.q_proj.weight"
    base = _base_variant(plain, tmp_path / "base", **{q0: dtype})
    pattern = rf"adapter_model\.safetensors: tensor '{A0}': a LoRA delta on base tensor '{q0}', "
    pattern += rf"which is {name}; only float tensors \(F16, BF16, F32, F64\) can take one"
    with pytest.raises(CheckpointError, match=pattern):
        adapter_deltas(plain.adapter_dir, base)
    with pytest.raises(CheckpointError, match=pattern):
        negate(base, plain.adapter_dir, tmp_path / "out")
    with pytest.raises(CheckpointError, match=pattern):
        negate_lora(plain.adapter_dir, tmp_path / "neg", base=base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.fixture(scope="module")
def gpt2_case(tmp_path_factory) -> Case:
    make_model, kwargs, _, _ = CASES["fan_in_fan_out"]
    return _build(tmp_path_factory.mktemp("gpt2"), make_model, LoraConfig(**kwargs))


def test_square_layer_needs_the_model_type(tmp_path, gpt2_case):
    """GPT-2's square c_proj [32, 32] fits both orientations. Without config.json (a renamed
    weights file, or a directory without it) its class cannot be told: refused, saying to pass
    the model directory, whether fan_in_fan_out is set or the module only has a Conv1D name.
    A config.json with remote code (auto_map) cannot tell it either."""
    from sku_fast.engine.arithmetic import negate

    c = gpt2_case
    renamed = tmp_path / "gpt2.safetensors"
    renamed.write_bytes((c.base_dir / "model.safetensors").read_bytes())
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(renamed.read_bytes())
    square = r"base tensor 'transformer\.h\.0\.attn\.c_proj\.weight' is square \[32, 32\]: PEFT "
    square += r"transposes the delta of a GPT-2-style Conv1D layer but not of an nn\.Linear"
    for base in (renamed, bare, _shapes(c)):
        with pytest.raises(CheckpointError) as refused:
            adapter_deltas(c.adapter_dir, base)
        message = str(refused.value)
        assert message.startswith(f"{c.adapter_dir / ADAPTER_CONFIG}: fan_in_fan_out is true and ")
        assert re.search(square, message), message
        assert message.endswith("pass the base as the model directory that holds its config.json")
    with pytest.raises(CheckpointError, match=square):
        negate(renamed, c.adapter_dir, tmp_path / "out")
    with pytest.raises(CheckpointError, match=square):
        negate_lora(c.adapter_dir, tmp_path / "neg", base=bare)

    cleared = _copy_adapter(c.adapter_dir, tmp_path / "cleared")
    _edit_config(cleared, fan_in_fan_out=False)
    with pytest.raises(
        CheckpointError, match=r"module 'transformer\.h\.0\.attn\.c_proj' is named "
    ):
        adapter_deltas(cleared, bare)

    (bare / "config.json").write_text(json.dumps({"model_type": "gpt2", "auto_map": {"x": "y"}}))
    with pytest.raises(CheckpointError, match=r"config\.json names its own model code \(auto_map"):
        adapter_deltas(c.adapter_dir, bare)
    (bare / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert set(adapter_deltas(c.adapter_dir, bare)) == c.expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "cleared", "gpt2.safetensors"]


@pytest.mark.parametrize(
    "scale, message",
    [
        (0.0, r"scale must be positive, got 0: .* use `sku-fast arithmetic BASE OUT --add"),
        (-1.0, r"scale must be positive, got -1: λ is how much of the task vector to remove"),
        (1e39, r"scale must be at most 1000, got 1e\+39: larger weights are not meaningful"),
        (1001.0, r"scale must be at most 1000, got 1001: .* overflow half-precision outputs"),
        (float("nan"), r"scale must be finite, got nan"),
        (float("-inf"), r"scale must be finite, got -inf"),
        ("half", r"scale must be a number, got 'half'"),
    ],
)
def test_negate_lora_scale_refused(tmp_path, plain, scale, message):
    with pytest.raises(ValueError, match=message):
        negate_lora(plain.adapter_dir, tmp_path / "out", scale=scale, base=plain.base_dir)
    assert list(tmp_path.iterdir()) == []


def test_lora_factors_beyond_memory_are_one_error(tmp_path, plain, monkeypatch):
    """negate/arithmetic hold each module's factors whole in fp32: running out of memory there
    is a CheckpointError naming the module, not a MemoryError traceback."""
    from sku_fast.engine import adapter as lora
    from sku_fast.engine.arithmetic import negate

    def out_of_memory(raw, entry):
        raise MemoryError

    monkeypatch.setattr(lora, "to_float", out_of_memory)
    pattern = r"adapter_model\.safetensors: module 'model\.layers\.0\.self_attn\.q_proj': its "
    pattern += r"LoRA factors take 768 bytes and 768 bytes in fp32, more than fits in memory"
    with pytest.raises(CheckpointError, match=pattern):
        negate(plain.base_dir, plain.adapter_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_negation_is_computed_wide_and_rounded_once(tmp_path, plain, dtype):
    """The engine's bytes equal the whole-tensor computation: fp32 (fp64 for F64), one
    rounding to nearest even, NaN kept; infinities and subnormals included."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ADAPTER_CONFIG).write_bytes((plain.adapter_dir / ADAPTER_CONFIG).read_bytes())
    tensors = {k: v.to(dtype) for k, v in load_file(plain.adapter_dir / ADAPTER_WEIGHTS).items()}
    key_b = B0.replace("layers.0", "layers.1")
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, -0.0, 3.0])
    tensors[key_b].view(-1)[: special.numel()] = special.to(dtype)
    save_file(tensors, adapter / ADAPTER_WEIGHTS)
    scale = 0.3
    out = negate_lora(adapter, tmp_path / "neg", scale=scale, base=plain.base_dir)
    neg = load_file(out / ADAPTER_WEIGHTS)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    lm = "base_model.model.lm_head.weight"
    theta = plain.base["lm_head.weight"].to(wide)
    for key, value in tensors.items():
        if ".lora_B" in key:
            want = (value.to(wide) * -scale).to(dtype)
        elif key == lm:
            want = (theta - scale * (value.to(wide) - theta)).to(dtype)
        else:
            want = value
        got = neg[key]
        assert got.dtype == dtype
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan), key  # NaN stays NaN (its payload may differ)
        assert got[~nan].view(torch.uint8).equal(want[~nan].view(torch.uint8)), key
    assert torch.isnan(neg[key_b].view(-1)[0])


# A peak-RSS probe: runs a command and prints the peak RSS of its process tree (KiB).
MEASURE = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.slow
def test_negate_lora_streams_a_large_lora_b(tmp_path):
    """A 315 MB bf16 lora_B is negated in bounded chunks: peak RSS stays far below its size
    (reading it whole took ~4× its size), and sampled rows are right."""
    import subprocess
    import sys

    from sku_fast.engine.checkpoint import encode_header, read_file

    rows, rank, cols = 19_660_800, 8, 16  # lora_B [rows, 8] bf16: 315 MB
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["proj"]}
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    key_a, key_b = "base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"
    header, _ = encode_header({}, [(key_a, "BF16", (rank, cols)), (key_b, "BF16", (rows, rank))])
    rng = np.random.default_rng(0)
    with open(adapter / ADAPTER_WEIGHTS, "wb") as f:
        f.write(header)
        f.write(rng.integers(0x3C00, 0x3F80, rank * cols, dtype=np.uint16).tobytes())
        block = 1 << 22
        for start in range(0, rows * rank, block):
            count = min(block, rows * rank - start)
            f.write(rng.integers(0x3C00, 0x3F80, count, dtype=np.uint16).tobytes())
    size_mb = (adapter / ADAPTER_WEIGHTS).stat().st_size / 2**20

    command = [sys.executable, "-c", "from sku_fast.cli import main; main()"]
    command += ["negate-lora", str(adapter), str(tmp_path / "neg"), "--scale", "0.5", "-q"]
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.strip()) / 1024
    print(f"peak RSS of negate-lora on a {size_mb:.0f} MB adapter: {peak_mb:.0f} MB")
    assert peak_mb < 120, f"peak RSS {peak_mb:.0f} MB for a {size_mb:.0f} MB lora_B"

    src, dst = (read_file(p / ADAPTER_WEIGHTS) for p in (adapter, tmp_path / "neg"))
    for entry_src, entry_dst in zip(src.tensors, dst.tensors, strict=True):
        assert (entry_src.name, entry_src.shape) == (entry_dst.name, entry_dst.shape)
        for row in (0, entry_src.shape[0] // 3, entry_src.shape[0] - 1):
            span = entry_src.nbytes // entry_src.shape[0]
            with open(entry_src.file, "rb") as a, open(entry_dst.file, "rb") as b:
                a.seek(entry_src.offset + row * span)
                b.seek(entry_dst.offset + row * span)
                x, y = a.read(span), b.read(span)
            x = torch.frombuffer(bytearray(x), dtype=torch.bfloat16)
            y = torch.frombuffer(bytearray(y), dtype=torch.bfloat16)
            want = (x.float() * -0.5).bfloat16() if entry_src.name == key_b else x
            assert y.view(torch.int16).equal(want.view(torch.int16)), (entry_src.name, row)


# ----------------------------------------------------------------------------- config fuzzing

_FUZZ_A = np.arange(8, dtype=np.float32).reshape(2, 4) / 7  # lora_A [r=2, in=4]
_FUZZ_B = (np.arange(6, dtype=np.float32).reshape(3, 2) - 2.5) / 3  # lora_B [out=3, r=2]
_FUZZ_BASE = {"proj.weight": (3, 4)}  # not square: the orientation is the shape's
_FUZZ_VALID = {"peft_type": "LORA", "r": 2, "lora_alpha": 6, "target_modules": ["proj"]}
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()  # NaN and ±inf included: json.dumps writes them as NaN / Infinity literals
    | st.sampled_from([0, 1, 2, 3, 6, 0.5, 2.0, 1e6, 1e39, -1])
    | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["proj", "pr.j", "x", "(", ".*", "p[", "proj|x"]) | st.text(max_size=4),
            children,
            max_size=3,
        )
    ),
    max_leaves=8,
)
_FIELDS = [
    "peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern",
    "alpha_pattern", "use_dora", "init_lora_weights", "target_modules", "lora_dropout",
    "modules_to_save", "bias", "task_type", "layers_to_transform",
]  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_weights(tmp_path_factory) -> Path:
    weights = tmp_path_factory.mktemp("fuzz") / ADAPTER_WEIGHTS
    save_file(
        {
            "base_model.model.proj.lora_A.weight": torch.from_numpy(_FUZZ_A),
            "base_model.model.proj.lora_B.weight": torch.from_numpy(_FUZZ_B),
        },
        weights,
    )
    return weights


def _fuzz_adapter(root: Path, weights: Path, text: str) -> Path:
    adapter = root / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    adapter.mkdir(parents=True)
    (adapter / ADAPTER_WEIGHTS).write_bytes(weights.read_bytes())
    (adapter / ADAPTER_CONFIG).write_text(text)
    return adapter


def _first_match(patterns: dict, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", "proj"):
            return value
    return default


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    changes=st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=4),
    extra=st.dictionaries(st.text(min_size=1, max_size=8), _JSON, max_size=2),
)
def test_fuzzed_adapter_configs_give_peft_deltas_or_a_checkpoint_error(
    tmp_path_factory, fuzz_weights, changes, extra
):
    """Random JSON in each field (and random extra keys): the parser either refuses it with a
    CheckpointError naming the config, or accepts it, and then the values it used are valid
    (r a positive int matching the tensors, alpha finite in (0, 1e6], flags true/false/null)
    and the delta is the one of a clean config holding just those values: scaling·B·A."""
    weights = fuzz_weights
    root = tmp_path_factory.mktemp("case")
    config = {**extra, **_FUZZ_VALID, **changes}
    adapter = _fuzz_adapter(root, weights, json.dumps(config))
    try:
        deltas = adapter_deltas(adapter, _FUZZ_BASE)
    except CheckpointError as error:
        assert str(error).startswith(str(adapter)), str(error)
        event("refused")
        return
    event("accepted")
    # accepted: the values it must have used are valid
    rank = _first_match(config.get("rank_pattern") or {}, config["r"])
    alpha = _first_match(config.get("alpha_pattern") or {}, config["lora_alpha"])
    assert type(rank) is int and rank == 2, config
    assert type(alpha) in (int, float) and math.isfinite(alpha) and 0 < alpha <= 1e6, config
    for flag in ("use_rslora", "fan_in_fan_out", "use_dora"):
        assert config.get(flag) in (True, False, None), config
    assert config["peft_type"] == "LORA" and not config.get("use_dora"), config
    # ... and the delta is the one of a clean config with those values
    clean = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": alpha,
        "use_rslora": bool(config.get("use_rslora")),
    }
    clean_adapter = _fuzz_adapter(root / "clean", weights, json.dumps(clean))
    expected = adapter_deltas(clean_adapter, _FUZZ_BASE)
    (name,) = deltas
    got, want = deltas[name], expected[name]
    assert got.scaling == want.scaling == alpha / (math.sqrt(2) if clean["use_rslora"] else 2)
    assert np.array_equal(got.left, _FUZZ_B) and np.array_equal(got.right, _FUZZ_A)  # plain B·A
    assert np.array_equal(want.left, got.left) and np.array_equal(want.right, got.right)
