"""A tiny model for tests and quick checks: every part present, all dims small and divisible by 2.

Usage: --config configs/tiny.py:variant=chat,stage=3
"""

import ml_collections

from ziya_jax.config import for_stage, parse_arg

LORA_TARGETS = (r"vision_model/layers/self_attn/(qkv|projection)", r"language_model/layers/self_attn/(q_proj|v_proj)")


def get_config(arg=None):
    args = parse_arg(arg, stage=2, variant="base", lora_rank=4)
    model = dict(
        variant=args["variant"],
        vision=dict(image_size=28, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64),
        qformer=dict(
            width=32,
            depth=2,
            num_heads=4,
            mlp_dim=64,
            cross_attention_frequency=2,
            vocab_size=96,
            max_position_embeddings=32,
            embed_dim=16,
        ),
        llm=dict(vocab_size=128, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64),
        num_query_tokens=4,
        image_token_id=127,
        instruction_len=16,
    )
    config = ml_collections.ConfigDict()
    config.stage = args["stage"]
    config.model = for_stage(model, args["stage"], LORA_TARGETS, args["lora_rank"])
    config.mesh = (-1, 1, 1)
    return config
