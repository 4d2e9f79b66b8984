"""Install dino_fast. `kernels/` is installed as the subpackage `dino_fast.kernels` (a bare
top-level `kernels` module would shadow the Hugging Face `kernels` package)."""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (HERE / "dino_fast" / "__init__.py").read_text()).group(1)

setup(
    name="dino_fast",
    version=VERSION,
    description="Triton-accelerated DINO self-supervised training of Vision Transformers",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["dino_fast", "dino_fast.kernels"],
    package_dir={"dino_fast": "dino_fast", "dino_fast.kernels": "kernels"},
    package_data={"dino_fast.kernels": ["*.c"]},  # the CPU kernels, compiled at first use
    install_requires=[
        # Lower bounds the tests pass on (.ci/compat: torch 2.11 / torchvision 0.26 / triton
        # 3.6; .ci/run: the current releases); ranges, never an exact torch, so that pip does
        # not fetch a second multi-GB build.
        "torch>=2.11",
        "torchvision>=0.26",
        "timm>=1.0",
        # Triton ships Linux wheels only; elsewhere the eager paths run.
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "matplotlib",  # the PNG pictures: training curves, attention maps, benchmark charts
        "tqdm",  # the training progress bar
    ],
    extras_require={"dev": ["pytest>=7", "pytest-benchmark>=4", "ruff"]},
    entry_points={"console_scripts": [
        "dino-fast-train=dino_fast.train:main",
        "dino-fast-knn=dino_fast.knn:main",
    ]},
)
