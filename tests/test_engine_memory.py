"""Memory stays flat: the peak RSS of a `sku-fast negate` process must not grow with the model.

Negates a 0.25 GB and a 1 GB bf16 checkpoint (plus their fine-tuned twins) in fresh processes
and reads each one's peak RSS from a helper process (`RUSAGE_CHILDREN` of a process that has
no other child). Budget: < 32 MB growth, < 256 MB in total.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sku_fast.engine.checkpoint import read_file

ROWS, COLS = 2048, 4096  # one bf16 tensor of 16 MiB, the size of a 7B model's attention block
TENSOR_BYTES = ROWS * COLS * 2

MEASURE = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
"""


def write_pair(root: Path, total_bytes: int, seed: int) -> tuple[Path, Path]:
    """A base and a tuned bf16 checkpoint of `total_bytes` each, written tensor by tensor."""
    rng = np.random.default_rng(seed)
    count = total_bytes // TENSOR_BYTES
    header = {"__metadata__": {"format": "pt"}}
    for i in range(count):
        begin = i * TENSOR_BYTES
        header[f"layers.{i}.weight"] = {
            "dtype": "BF16",
            "shape": [ROWS, COLS],
            "data_offsets": [begin, begin + TENSOR_BYTES],
        }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    paths = (root / "base.safetensors", root / "tuned.safetensors")
    with open(paths[0], "wb") as base_file, open(paths[1], "wb") as tuned_file:
        base_file.write(len(text).to_bytes(8, "little") + text)
        tuned_file.write(len(text).to_bytes(8, "little") + text)
        for _ in range(count):
            # finite bf16 values of magnitude ~0.01, and a twin that differs in low mantissa bits
            bits = rng.integers(0, 1 << 16, ROWS * COLS, dtype=np.uint16)
            base = (bits & 0x807F) | 0x3C00
            base_file.write(base.tobytes())
            tuned_file.write((base ^ (bits >> 13)).tobytes())
    return paths


def peak_rss_mb(base: Path, tuned: Path, out: Path) -> float:
    command = [sys.executable, "-c", "from sku_fast.cli import main; main()"]
    command += ["negate", str(base), str(tuned), str(out), "--quiet"]
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *command],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return int(result.stdout.strip()) / 1024


@pytest.mark.slow
def test_peak_rss_is_flat_in_model_size(tmp_path):
    peaks = {}
    for gigabytes in (0.25, 1.0):
        root = tmp_path / f"{gigabytes}"
        root.mkdir()
        base, tuned = write_pair(root, int(gigabytes * (1 << 30)), seed=int(gigabytes * 4))
        out = root / "out"
        peaks[gigabytes] = peak_rss_mb(base, tuned, out)
        written = read_file(out / "model.safetensors").tensors
        assert sum(t.nbytes for t in written) == sum(t.nbytes for t in read_file(base).tensors)
        shutil.rmtree(root)
    print(f"peak RSS of sku-fast negate: {peaks}")
    growth = peaks[1.0] - peaks[0.25]
    assert growth < 32, f"peak RSS grew by {growth:.1f} MB from 0.25 GB to 1 GB: {peaks}"
    assert peaks[1.0] < 256, f"peak RSS {peaks[1.0]:.1f} MB on a 1 GB checkpoint"
