"""Peak GPU memory per stage of the high-resolution pipeline, estimated without a GPU.

How: the real SD-XL UNet and VAE architectures (random weights) are built on PyTorch's ``meta``
device, where tensors have shapes but no storage, and one forward pass is traced under a
dispatch mode that adds up the bytes of every live intermediate tensor (freed when the last
reference to its storage dies), which gives the peak of live activations. Each UNet call shape
is traced at its real size (batch 1, scaled by the batch), so GSPN's line-block inference
applies where the processors' threshold says it would. The VAE decoder is traced once at its
tile size (tiled decoding keeps the tile constant). Weights are counted from the parameters. The
original attention is counted as a fused SDPA kernel (flash / memory-efficient: only its
output), which is what PyTorch runs on a GPU for fp16/bf16. GSPN's scans are counted as the CUDA
kernel (``scan_backend="kernel"``: its outputs only, no fp32 copies of the gates) or as the
PyTorch reference (``"reference"``: its fp32 temporaries; its Python loop over lines makes
large traces slow, so then the activations are fitted, affine in the latent pixels, on two small
sizes).

Not counted: the CUDA context and cuBLAS/cuDNN workspaces (about 0.5-1 GB) and allocator
fragmentation, so a measured peak is expected somewhat above these numbers.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..convert import convert
from ..ops import backend
from .demofusion import _block_level, _level_size, chunk_feed_forward
from .stages import dilation_factor, plan_stage_sizes, resolve_local_denoising

# SD-XL base 1.0's UNet and VAE configurations (stabilityai/stable-diffusion-xl-base-1.0), for random-weight models.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)
# Parameters of SD-XL's two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers).
SDXL_TEXT_ENCODER_PARAMS = 123_060_480 + 694_659_840
# Latent-sized tensors the stage loop keeps alive besides the UNet call (latents, clean, noise,
# scaled input, prediction, local value/count, dilated padded/blurred/value copies).
LATENT_BUFFERS = 10
GIB = 2**30


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created inside the mode, and their peak."""

    def __init__(self, external: set[int]) -> None:
        super().__init__()
        self.external = external
        self.live: dict[int, list[int]] = {}
        self.owners: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        if id(tensor) in self.owners:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.external:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        self.owners[id(tensor)] = key
        weakref.finalize(tensor, self._release, id(tensor), key)

    def _release(self, tensor_id: int, key: int) -> None:
        self.owners.pop(tensor_id, None)
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


@contextlib.contextmanager
def _fused_sdpa() -> Iterator[None]:
    """Count SDPA as a fused kernel (its output only): on ``meta`` it would decompose into the N^2 math path."""
    original = F.scaled_dot_product_attention

    def fused(query, key, value, *args, **kwargs):
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _kernel_scan(x, lam, gate_logits, direction, chunk_size=None, initial_state=None, return_final_state=False):
    """The CUDA kernel's memory: it writes h (and the final line) in x's dtype, with no fp32 copy of the gates."""
    h = torch.empty_like(x)
    if not return_final_state:
        return h
    n_perp = x.shape[1] if direction in ("left_to_right", "right_to_left") else x.shape[2]
    return h, x.new_empty(x.shape[0], n_perp, x.shape[-1])


def _kernel_scan_fused(x, *args, **kwargs):
    return torch.empty_like(x)


SCAN_BACKENDS = ("kernel", "reference")


@contextlib.contextmanager
def _scan_memory(scan_backend: str) -> Iterator[None]:
    """Trace GSPN's scans as the CUDA kernel (outputs only) or as the PyTorch reference (its fp32 temporaries).

    Meta tensors resolve to the reference backend; for ``"kernel"`` it is swapped for the kernel's memory model.
    """
    if scan_backend not in SCAN_BACKENDS:
        raise ValueError(f"scan_backend must be one of {', '.join(SCAN_BACKENDS)}; got {scan_backend!r}.")
    if scan_backend == "reference":
        yield
        return
    reference = backend.REFERENCE
    backend.REFERENCE = backend.Backend("kernel memory model", _kernel_scan, _kernel_scan_fused)
    try:
        yield
    finally:
        backend.REFERENCE = reference


def peak_activation_bytes(model: torch.nn.Module, run, *inputs: torch.Tensor, scan_backend: str = "kernel") -> int:
    """Peak bytes of the intermediate tensors of ``run(*inputs)`` on a ``meta`` model (weights and inputs excluded).

    ``scan_backend``: GSPN's scans counted as the CUDA kernel (``"kernel"``) or the PyTorch reference.
    """
    external = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), *inputs]}
    mode = _LiveBytes(external)
    with torch.no_grad(), _fused_sdpa(), _scan_memory(scan_backend), mode:
        out = run(*inputs)
        del out
    return mode.peak


def meta_sdxl(gspn: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """SD-XL's UNet (GSPN-converted or not) and VAE on the ``meta`` device: architecture only, no memory."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(dtype)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG).to(dtype)
    if gspn:
        convert(unet, "sdxl")
    return unet, vae


def _unet_peak(
    unet: UNet2DConditionModel, batch: int, height: int, width: int, chunking: bool, scan_backend: str = "kernel"
) -> int:
    dtype = unet.dtype
    sample = torch.empty(batch, 4, height, width, device="meta", dtype=dtype)
    embeds = torch.empty(batch, 77, 2048, device="meta", dtype=dtype)
    added = {
        "text_embeds": torch.empty(batch, 1280, device="meta", dtype=dtype),
        "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
    }
    chunk_feed_forward(unet, height if chunking else None, width)
    try:
        return peak_activation_bytes(
            unet,
            lambda x, e: unet(x, 999, encoder_hidden_states=e, added_cond_kwargs=added),
            sample,
            embeds,
            scan_backend=scan_backend,
        )
    finally:
        chunk_feed_forward(unet, None)


def gspn_layer_bytes_per_token_channel(
    unet: UNet2DConditionModel, layer: str, height: int, width: int, line_block: bool, scan_backend: str = "kernel"
) -> float:
    """Peak bytes of one GSPN layer's call (its input excluded, its output included) per token and channel.

    ``unet`` is a converted ``meta`` UNet, ``layer`` an attn1 name, ``height x width`` the UNet's latent (the layer
    sees it at its level's size); ``line_block`` forces line-block inference on or off for the call.
    """
    attn = unet.get_submodule(layer)
    processor = attn.processor
    level = _block_level(layer, len(unet.config.block_out_channels))
    processor.latent_size = (_level_size(height, level), _level_size(width, level))
    tokens = processor.latent_size[0] * processor.latent_size[1]
    hidden = torch.empty(1, tokens, processor.channels, device="meta", dtype=unet.dtype)
    saved = processor.line_block_tokens
    processor.line_block_tokens = 0 if line_block else None
    try:
        peak = peak_activation_bytes(attn, attn, hidden, scan_backend=scan_backend)
    finally:
        processor.line_block_tokens = saved
    return peak / (tokens * processor.channels)


@dataclass
class StageMemory:
    """Estimated peak GPU memory of one stage, in GiB."""

    stage: int
    width: int
    height: int
    unet_input: str
    weights_gib: float
    unet_activations_gib: float
    latents_gib: float
    decode_gib: float
    peak_gib: float


def estimate_hires_memory(
    height: int = 8192,
    width: int = 16384,
    gspn: bool = True,
    local_denoising: str = "auto",
    view_batch_size: int = 16,
    split_cfg: bool | None = None,
    forward_chunking: bool = True,
    cpu_offload: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    scan_backend: str = "kernel",
) -> list[StageMemory]:
    """Peak GPU memory per stage of SD-XL high-resolution generation (defaults: 16384x8192, bf16, GSPN).

    The options mean what they mean in :class:`~.demofusion.GSPNDemoFusionSDXLPipeline`; with
    ``cpu_offload`` only the UNet (or the VAE, while decoding) is on the GPU. The last stage
    includes the tiled VAE decode of the final image. ``scan_backend``: GSPN's scans as the CUDA kernel
    (what a CUDA run uses) or the PyTorch reference. See the module docstring for the method.
    """
    unet, vae = meta_sdxl(gspn, dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    window = SDXL_UNET_CONFIG["sample_size"]
    native_area = window * window
    unet_bytes = sum(p.numel() for p in unet.parameters()) * itemsize
    vae_bytes = sum(p.numel() for p in vae.parameters()) * itemsize
    text_bytes = SDXL_TEXT_ENCODER_PARAMS * itemsize

    @functools.cache
    def traced(h: int, w: int) -> int:
        return _unet_peak(unet, 1, h, w, forward_chunking, scan_backend)

    if gspn and scan_backend == "reference":
        # Activations per sample are affine in the latent pixels: fit on two small sizes.
        small, large = (window // 2, window // 2), (window, window)
        per_pixel = (traced(*large) - traced(*small)) / (large[0] * large[1] - small[0] * small[1])
        fixed = traced(*small) - per_pixel * small[0] * small[1]

        def unet_activations(batch: int, h: int, w: int) -> float:
            return batch * (fixed + per_pixel * h * w)

    else:

        def unet_activations(batch: int, h: int, w: int) -> float:
            return batch * traced(h, w)

    tile = vae.config.sample_size // 8
    tile_latent = torch.empty(1, 4, tile, tile, device="meta", dtype=dtype)
    tile_peak = peak_activation_bytes(vae, lambda z: vae.decode(z).sample, tile_latent)

    rows = []
    sizes = plan_stage_sizes(height, width, window * 8, 8)
    for k, (stage_h, stage_w) in enumerate(sizes):
        latent_h, latent_w = stage_h // 8, stage_w // 8
        split = split_cfg if split_cfg is not None else (k > 0 and latent_h * latent_w > 4 * native_area)
        cfg_batch = 1 if split else 2
        mode = resolve_local_denoising(local_denoising, gspn, latent_h * latent_w, native_area)
        if k == 0 or mode == "full":
            batch, call_h, call_w = cfg_batch, latent_h, latent_w
        else:
            batch, call_h, call_w = cfg_batch * view_batch_size, window, window
        activations = unet_activations(batch, call_h, call_w)
        if k > 0:
            d = dilation_factor(latent_h, latent_w, window)
            sub = (-(-latent_h // d), -(-latent_w // d))
            activations = max(activations, unet_activations(cfg_batch * min(view_batch_size, d * d), *sub))
        latents = LATENT_BUFFERS * 4 * latent_h * latent_w * itemsize
        decode = 0.0
        if k == len(sizes) - 1:
            # Diffusers' tiled decode keeps every decoded tile (overlap 1/4: (4/3)^2 of the image) plus the result.
            image = 3 * stage_h * stage_w * itemsize
            decode = tile_peak + image * (1 + (4 / 3) ** 2)
        weights = unet_bytes if cpu_offload else unet_bytes + vae_bytes + text_bytes
        decode_weights = vae_bytes if cpu_offload else weights
        peak = max(weights + activations + latents, decode_weights + decode + latents)
        rows.append(
            StageMemory(
                stage=k,
                width=stage_w,
                height=stage_h,
                unet_input=f"{batch}x{call_w}x{call_h}",
                weights_gib=weights / GIB,
                unet_activations_gib=activations / GIB,
                latents_gib=latents / GIB,
                decode_gib=decode / GIB,
                peak_gib=peak / GIB,
            )
        )
    return rows


def as_dicts(rows: list[StageMemory]) -> list[dict]:
    return [asdict(row) for row in rows]
