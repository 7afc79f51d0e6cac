"""Tiny diffusers models with random weights, built from their configs (no download), with inputs for them.

``tiny_unet`` is a Stable-Diffusion-shaped ``UNet2DConditionModel`` (cross-attention blocks with
``to_q``/``to_k``/``to_v``/``to_out.0``, ResNet blocks with ``conv1``/``conv2``); ``tiny_sd3_transformer``
is an SD3 DiT (``SD3Transformer2DModel``: joint attention, a patch-embedding convolution). Both are in eval
mode; each ``*_inputs`` function gives a batch of keyword arguments the model takes, drawn from ``seed``.
"""

from __future__ import annotations

import torch


def tiny_unet(seed: int = 0, cross_attention_dim: int = 8):
    """A two-level ``UNet2DConditionModel`` on 4-channel 8x8 latents (about 51 thousand parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def unet_inputs(batch: int = 2, seed: int = 1, cross_attention_dim: int = 8, tokens: int = 3) -> dict:
    """Noisy latents, timesteps and text states for :func:`tiny_unet`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, tokens, cross_attention_dim, generator=generator),
    }


def tiny_sd3_transformer(seed: int = 0):
    """A one-block ``SD3Transformer2DModel`` (DiT) on 4-channel 8x8 latents."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=16,
    ).eval()


def sd3_inputs(batch: int = 2, seed: int = 1, tokens: int = 3) -> dict:
    """Noisy latents, timesteps, text states and pooled text for :func:`tiny_sd3_transformer`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, tokens, 16, generator=generator),
        "pooled_projections": torch.randn(batch, 8, generator=generator),
    }
