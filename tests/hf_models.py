"""Tiny randomly initialised transformers models (the ground truth) and matching inputs."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
)

IMAGE_TOKEN = 127
NUM_QUERIES = 4
IMAGE_SIZE = 28


def make_hf_model(
    kind: str,
    num_kv_heads: int = 2,
    rope_theta: float = 10000.0,
    cross_attention_frequency: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
):
    """A Blip2 or InstructBlip model with a Llama LM, weights perturbed away from HF's tiny init values."""
    torch.manual_seed(seed)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=14,
        qkv_bias=True,
        layer_norm_eps=1e-6,
    )
    qformer = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=32,
        vocab_size=100,
        max_position_embeddings=64,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        vocab_size=128,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
    )
    return build_hf_model(kind, vision, qformer, text, NUM_QUERIES, IMAGE_TOKEN, scale=0.1)


def build_hf_model(
    kind: str, vision: dict, qformer: dict, text: LlamaConfig, num_queries: int, image_token: int, scale
):
    """A Blip2 or InstructBlip model of these sub-configs, every weight moved by normal noise of std `scale` (the
    caller seeds torch)."""
    config_cls, model_cls = {
        "blip2": (Blip2Config, Blip2ForConditionalGeneration),
        "instructblip": (InstructBlipConfig, InstructBlipForConditionalGeneration),
    }[kind]
    config = config_cls(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=num_queries,
        image_token_index=image_token,
    )
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def make_inputs(batch: int = 2, images_per_row: int = 1, text_len: int = 6, seed: int = 1):
    """input_ids with each row's image placeholders first, an attention mask with right padding on the
    last row, pixel values (NCHW, one per image, row-major) and Q-Former instruction ids/mask."""
    g = torch.Generator().manual_seed(seed)
    n_img = NUM_QUERIES * images_per_row
    ids = torch.randint(3, 120, (batch, n_img + text_len), generator=g)
    ids[:, :n_img] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    mask[-1, n_img + text_len // 2 :] = 0
    pixels = torch.randn(batch * images_per_row, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    qids = torch.randint(1, 100, (batch, 5), generator=g)
    qmask = torch.ones_like(qids)
    qmask[0, 3:] = 0
    return ids, mask, pixels, qids, qmask


def to_jax_pixels(pixels: torch.Tensor, batch: int) -> np.ndarray:
    """HF NCHW, one image per entry -> ziya_jax [B, N, H, W, C]."""
    x = pixels.numpy().transpose(0, 2, 3, 1)
    return x.reshape(batch, -1, *x.shape[1:])
