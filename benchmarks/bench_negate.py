"""Streaming negation of a Llama-shaped bf16 checkpoint: sku-fast against its baselines.

    out = base − (tuned − base)  on a TinyLlama-1.1B-shaped model (2.2 GB bf16, two shards)

Measured side by side in one run, each as a fresh subprocess whose wall time and peak RSS a
helper process reads (`RUSAGE_CHILDREN`):

- sku-fast:           `sku-fast negate BASE TUNED OUT --quiet`
- safetensors+torch:  per shard, `load_file` both, `(2·b − t)` in fp32, round, `save_file`
- mergekit:           `mergekit-yaml` task_arithmetic with weight −1, when its CLI is found
                      (install: see benchmarks/README.md; `MERGEKIT_YAML=/path/to/mergekit-yaml`)
- I/O floor:          read both inputs and write the output's bytes with plain file I/O, fsync

The checkpoints are generated once and cached in `$SKU_BENCH_DIR` (default: the system temp
directory), never in the repository. Run: `make bench` or
`pytest benchmarks/bench_negate.py --benchmark-only -s`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sku_fast.engine.checkpoint import open_checkpoint

# TinyLlama-1.1B: 22 layers, hidden 2048, MLP 5632, 32 heads of 64, 4 KV heads, vocab 32000
HIDDEN, MLP, LAYERS, KV, VOCAB = 2048, 5632, 22, 256, 32000
ROUNDS = 3
CACHE = Path(os.environ.get("SKU_BENCH_DIR", tempfile.gettempdir())) / "sku-fast-bench-negate"
RESULTS: dict[str, dict] = {}

MEASURE = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_rss_mb": rss}))
    """
)

TORCH_WAY = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    base, tuned, out = map(Path, sys.argv[1:4])
    out.mkdir()
    index = json.loads((base / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        b = load_file(base / shard)
        t = load_file(tuned / shard)
        result = {k: (2 * b[k].float() - t[k].float()).to(b[k].dtype) for k in b}
        del t
        save_file(result, out / shard, metadata={"format": "pt"})
    for name in ("model.safetensors.index.json", "config.json"):
        shutil.copy(base / name, out / name)
    """
)

IO_FLOOR = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    base, tuned, out = map(Path, sys.argv[1:4])
    out.mkdir()
    chunk = 8 << 20
    for shard in sorted(base.glob("*.safetensors")):
        b, t = open(shard, "rb"), open(tuned / shard.name, "rb")
        with b, t, open(out / shard.name, "wb") as o:
            while block := b.read(chunk):
                t.read(chunk)
                o.write(block)
            o.flush()
            os.fsync(o.fileno())
    """
)


def _layer_shapes() -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    shapes: list = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.up_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, MLP)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": MLP,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": VOCAB,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def _write_shard(path: Path, tensors: list, rng: np.random.Generator, twin: Path) -> None:
    """Writes a shard and its fine-tuned twin tensor by tensor (bounded memory): finite bf16
    weights of magnitude ~0.01, the twin differing in the low mantissa bits."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as b, open(twin, "wb") as t:
        for f in (b, t):
            f.write(len(text).to_bytes(8, "little") + text)
        for _, shape in tensors:
            bits = rng.integers(0, 1 << 16, int(np.prod(shape)), dtype=np.uint16)
            base = (bits & 0x807F) | 0x3C00
            b.write(base.tobytes())
            t.write((base ^ (bits >> 13)).tobytes())


@pytest.fixture(scope="module")
def checkpoints() -> tuple[Path, Path]:
    base, tuned = CACHE / "base", CACHE / "tuned"
    if (CACHE / "done").is_file():
        return base, tuned
    shutil.rmtree(CACHE, ignore_errors=True)
    base.mkdir(parents=True)
    tuned.mkdir()
    shapes = _layer_shapes()
    half = len(shapes) // 2
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, part in enumerate((shapes[:half], shapes[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        _write_shard(base / shard, part, rng, tuned / shard)
        weight_map.update({name: shard for name, _ in part})
    total = sum(int(np.prod(s)) * 2 for _, s in shapes)
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    for root in (base, tuned):
        (root / "model.safetensors.index.json").write_text(index)
        (root / "config.json").write_text(json.dumps(CONFIG))
    (CACHE / "done").write_text("")
    return base, tuned


def _measure(command: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def _bench(benchmark, name: str, make_command, out: Path, bytes_moved: int) -> None:
    """Times ROUNDS fresh subprocesses (the output removed before each) and records the best
    wall time, its GB/s and the largest peak RSS."""
    runs: list[dict] = []

    def setup():
        shutil.rmtree(out, ignore_errors=True)
        return (), {}

    benchmark.pedantic(
        lambda: runs.append(_measure(make_command())), setup=setup, rounds=ROUNDS, iterations=1
    )
    best = min(r["wall_s"] for r in runs)
    RESULTS[name] = {
        "wall_s": best,
        "GB_per_s": bytes_moved / best / 1e9,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }
    benchmark.extra_info.update(RESULTS[name])
    benchmark.extra_info.update(shape="TinyLlama-1.1B", dtype="bf16", shards=2)


def _data_bytes(root: Path) -> int:
    return sum(e.nbytes for e in open_checkpoint(root).entries())


def _read_bf16(entry) -> np.ndarray:
    with open(entry.file, "rb") as f:
        f.seek(entry.offset)
        bits = np.frombuffer(f.read(entry.nbytes), dtype=np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


def _check_negation(base: Path, tuned: Path, out: Path, exact: bool) -> None:
    """Samples tensors of the result against 2·b − t in fp32, rounded once to bf16."""
    tuned_map = open_checkpoint(tuned).tensor_map()
    out_map = open_checkpoint(out).tensor_map()
    for entry in list(open_checkpoint(base).entries())[::40]:
        expected = 2 * _read_bf16(entry) - _read_bf16(tuned_map[entry.name])
        u = expected.view(np.uint32)
        rounded = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32)
        got = _read_bf16(out_map[entry.name])
        if exact:
            assert np.array_equal(got.view(np.uint32), rounded), entry.name
        else:  # a chain of bf16 operations is off by an ulp here and there
            assert np.allclose(got, rounded.view(np.float32), rtol=2**-7, atol=0), entry.name


def _sku_fast() -> list[str]:
    return [sys.executable, "-c", "from sku_fast.cli import main; main()"]


@pytest.mark.benchmark(group="negate")
def test_sku_fast(benchmark, checkpoints):
    base, tuned = checkpoints
    out = CACHE / "out-sku-fast"
    size = _data_bytes(base)
    _bench(
        benchmark,
        "sku-fast",
        lambda: [*_sku_fast(), "negate", str(base), str(tuned), str(out), "--quiet"],
        out,
        3 * size,
    )
    _check_negation(base, tuned, out, exact=True)


@pytest.mark.benchmark(group="negate")
def test_safetensors_torch(benchmark, checkpoints):
    base, tuned = checkpoints
    out = CACHE / "out-torch"
    cmd = [sys.executable, "-c", TORCH_WAY, str(base), str(tuned), str(out)]
    _bench(benchmark, "safetensors+torch", lambda: cmd, out, 3 * _data_bytes(base))
    _check_negation(base, tuned, out, exact=True)


def _mergekit_yaml() -> str | None:
    found = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    default = Path("/tmp/mergekit-venv/bin/mergekit-yaml")
    return found or (str(default) if default.is_file() else None)


@pytest.mark.benchmark(group="negate")
def test_mergekit_task_arithmetic(benchmark, checkpoints):
    mergekit = _mergekit_yaml()
    if mergekit is None:
        pytest.skip("mergekit-yaml not found (see benchmarks/README.md to install it)")
    base, tuned = checkpoints
    out = CACHE / "out-mergekit"
    config = CACHE / "mergekit.yml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: bfloat16\n"
        f"parameters:\n  normalize: false\n"
        f"models:\n  - model: {tuned}\n    parameters:\n      weight: -1.0\n"
    )
    cmd = [mergekit, str(config), str(out), "--no-copy-tokenizer", "--no-write-model-card",
           "--quiet", "-j", str(len(os.sched_getaffinity(0)))]  # fmt: skip
    _bench(benchmark, "mergekit task_arithmetic", lambda: cmd, out, 3 * _data_bytes(base))
    _check_negation(base, tuned, out, exact=False)


@pytest.mark.benchmark(group="negate")
def test_io_floor(benchmark, checkpoints):
    base, tuned = checkpoints
    out = CACHE / "out-floor"
    cmd = [sys.executable, "-c", IO_FLOOR, str(base), str(tuned), str(out)]
    _bench(benchmark, "I/O floor", lambda: cmd, out, 3 * _data_bytes(base))


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Prints the table recorded in benchmarks/README.md (run with -s) and keeps it as JSON
    beside the cached checkpoints."""
    yield
    if "sku-fast" not in RESULTS:
        return
    ours = RESULTS["sku-fast"]["wall_s"]
    lines = [
        "| method | wall (s) | GB/s | peak RSS (MB) | time vs sku-fast |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in RESULTS.items():
        lines.append(
            f"| {name} | {r['wall_s']:.2f} | {r['GB_per_s']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {r['wall_s'] / ours:.2f}x |"
        )
    print("\n" + "\n".join(lines))
    (CACHE / "results.json").write_text(json.dumps(RESULTS, indent=2))
