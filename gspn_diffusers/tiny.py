"""Tiny SD-1.5-like and SD-XL-like pipelines built from configs in code, with no download.

They run the real Diffusers pipelines, with the real block layout of each family (SD-XL's two
text encoders, pooled embeddings and size conditioning included) and a real CLIP tokenizer built
from the BPE vocabulary that open_clip_torch ships, at toy widths and random weights. Tests, the
demo and ``--tiny`` on the command line use them.
"""

from __future__ import annotations

import functools
import gzip

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TINY_KINDS = ("sd15", "sdxl")
_CLIP_VOCAB_SIZE = 49408
_BPE_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the file
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's vocabulary and merges, rebuilt from open_clip's BPE file exactly as CLIP defines them."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(lines[1 : 1 + _BPE_MERGES])
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [_BOS, _EOS]
    assert len(tokens) == _CLIP_VOCAB_SIZE, len(tokens)
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = _EOS) -> CLIPTokenizer:
    """The CLIP ViT-L/14 tokenizer (SD-1.5's; SD-XL's second one pads with ``"!"``), built offline."""
    vocab, merges = _clip_bpe()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad_token, model_max_length=77
    )


def _text_config(projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=_CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae() -> AutoencoderKL:
    # Four levels, like SD's VAE, so that the latent is 1/8 of the image as in the real models.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    )


_SCHEDULER_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def _tiny_sd15() -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**_SCHEDULER_BETAS, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_sdxl() -> StableDiffusionXLPipeline:
    text_dim, time_dim = 32, 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=2 * text_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_dim,
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=text_dim)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SCHEDULER_BETAS, timestep_spacing="leading"),
    )


def tiny_pipeline(kind: str = "sd15", seed: int = 0) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A tiny random pipeline of the SD-1.5 (``"sd15"``) or SD-XL (``"sdxl"``) family; same seed, same weights."""
    builders = {"sd15": _tiny_sd15, "sdxl": _tiny_sdxl}
    if kind not in builders:
        raise ValueError(f"Unknown tiny model {kind!r}; expected one of {', '.join(TINY_KINDS)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builders[kind]()
    pipe.set_progress_bar_config(disable=None)
    return pipe
