"""Install gspn-diffusers: ``pip install -e .`` (install torch first, see README.md).

The CUDA kernel is compiled just in time on first use by default. To build it ahead of time as
``gspn_diffusers._C``: ``GSPN_DIFFUSERS_BUILD_CUDA=1 pip install --no-build-isolation -e .``
(``GSPN_DIFFUSERS_CUDA_ARCH="8.0;9.0"`` picks the GPU architectures; ``auto`` builds when torch sees a GPU
and nvcc is present, ``0`` never builds).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the ahead-of-time build, or nothing when it is not wanted or not possible."""
    flag = os.environ.get("GSPN_DIFFUSERS_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no"):
        return [], {}
    spec = importlib.util.spec_from_file_location("cuda_build", ROOT / "gspn_diffusers" / "ops" / "cuda_build.py")
    cuda_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_build)
    cuda_home = cuda_build.find_cuda_home()
    if cuda_home is not None:
        os.environ.setdefault("CUDA_HOME", cuda_home)  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as error:
        if flag == "auto":
            return [], {}
        raise RuntimeError(
            "GSPN_DIFFUSERS_BUILD_CUDA=1 needs torch at build time: pip install --no-build-isolation -e ."
        ) from error
    if flag == "auto" and not (torch.cuda.is_available() and cuda_home and torch.version.cuda):
        return [], {}
    if cuda_home is None or torch.version.cuda is None:
        raise RuntimeError("GSPN_DIFFUSERS_BUILD_CUDA=1 needs nvcc (set CUDA_HOME) and a CUDA build of torch.")
    cxx, nvcc = cuda_build.compile_flags()
    extension = CUDAExtension(
        "gspn_diffusers._C",
        sources=[f"csrc/{name}" for name in cuda_build.SOURCES],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
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
        "clean-fid>=0.1.35",  # FID with its clean resize (the LinFusion protocol)
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",
        "ninja",  # builds the CUDA kernel (JIT on first use, or ahead of time)
    ],
    extras_require={
        # deepspeed: the ZeRO-2 config test; peft: the LoRA-on-GSPN conformance test; matplotlib: the PNGs of the GPU
        # check's dry run (tests/test_gpu_check_dry.py)
        "test": ["pytest>=8", "scipy", "ruff", "datasets>=2.19", "deepspeed", "peft>=0.13", "matplotlib"],
        "distill": ["datasets>=2.19", "pandas", "pyarrow"],
        "deepspeed": ["deepspeed"],  # only for distill/configs/deepspeed_zero2.yaml
    },
    entry_points={"console_scripts": ["gspn-diffusers=gspn_diffusers.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
