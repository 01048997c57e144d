"""Install gspn-diffusers: ``pip install -e .`` (install torch first, see README.md)."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = next(
    line.split('"')[1]
    for line in (ROOT / "gspn_diffusers" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

setup(
    name="gspn-diffusers",
    version=version,
    description="GSPN (Generalized Spatial Propagation Network) attention for Diffusers SD-1.5 / SD-XL pipelines",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gspn_diffusers", "gspn_diffusers.*"]),
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.35",
        "transformers>=4.45",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "open_clip_torch>=2.26",
        "torchmetrics>=1.4",
        "torch-fidelity>=0.3",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=8", "scipy", "ruff", "datasets>=2.19"],
        "distill": ["datasets>=2.19"],
    },
    entry_points={"console_scripts": ["gspn-diffusers=gspn_diffusers.cli:main"]},
)
