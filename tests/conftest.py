from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from gspn_diffusers.tiny import tiny_pipeline  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not any keyword (a parameter id "gpu")
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models are all per-op overhead: one thread is faster, and ~10x so on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reset_accelerate() -> None:
    """Each trainer run builds its own Accelerator; its process-wide singletons must not leak into the next."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def emulation():
    """The kernels' host emulation (built on first use), or a skip where the CUDA headers are missing."""
    from gspn_diffusers.ops import cuda, extension

    if cuda.find_cuda_home() is None:
        pytest.skip("the emulation needs the CUDA headers (nvcc's toolkit), which this machine lacks")
    module = extension.load_emulation()
    assert module is not None, extension.load_error("emulation")
    return module


@pytest.fixture(params=["sd15", "sdxl"])
def tiny_kind(request) -> str:
    return request.param


@pytest.fixture
def tiny_pipe(tiny_kind):
    pipe = tiny_pipeline(tiny_kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipe(pipe, height=64, width=64, steps=2, seed=0):
    """A deterministic short generation returning the decoded image array."""
    return pipe(
        "a lighthouse at dawn",
        num_inference_steps=steps,
        height=height,
        width=width,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images
