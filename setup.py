"""Builds the native engine sku_fast._C and maps kernels/ onto sku_fast.kernels.

Everything else lives in pyproject.toml. The extension needs only a C++17 compiler and
pybind11 (no torch), so `pip install .` works before torch is importable.
"""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

native_engine = Pybind11Extension(
    "sku_fast._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    depends=sorted(glob("csrc/*.hpp") + glob("csrc/*.inc")),
    cxx_std=17,
    # no fused multiply-add contraction: results must be bit-identical to the reference
    extra_compile_args=["-O3", "-ffp-contract=off"],
    extra_link_args=["-pthread"],
)

setup(
    packages=[
        "sku_fast",
        "sku_fast.commands",
        "sku_fast.demo_data",
        "sku_fast.engine",
        "sku_fast.eval",
        "sku_fast.kernels",
        "sku_fast.ops",
        "sku_fast.unlearn",
    ],
    package_dir={"sku_fast": "sku_fast", "sku_fast.kernels": "kernels"},
    package_data={"sku_fast": ["demo_data/*"]},
    ext_modules=[native_engine],
    cmdclass={"build_ext": build_ext},
)
