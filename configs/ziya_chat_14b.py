"""Ziya-Visual-Chat, full size: EVA ViT-g (39 layers) + instruction-aware Q-Former + Ziya-LLaMA-13B.

Usage: --config configs/ziya_chat_14b.py:stage=3 (stage 1, 2 or 3; variant=base gives the Base model).
"""
import ml_collections

from ziya_jax.config import for_stage, parse_arg

LORA_TARGETS = (r"vision_model/layers/self_attn/(qkv|projection)",
                r"language_model/layers/self_attn/(q_proj|k_proj|v_proj|o_proj)")


def get_config(arg=None):
    args = parse_arg(arg, stage=3, variant="chat", lora_rank=8)
    model = dict(
        variant=args["variant"],
        vision=dict(image_size=224, patch_size=14, width=1408, depth=39, num_heads=16, mlp_dim=6144,
                    layer_norm_eps=1e-6),
        qformer=dict(width=768, depth=12, num_heads=12, mlp_dim=3072, cross_attention_frequency=2,
                     layer_norm_eps=1e-12, vocab_size=30523, max_position_embeddings=512),
        llm=dict(vocab_size=39424, width=5120, depth=40, num_heads=40, num_kv_heads=40, head_dim=128,
                 mlp_dim=13824, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048),
        num_query_tokens=32,
        image_token_id=39423,
        dtype="bfloat16",
        param_dtype="float32",
        remat_policy="full",
    )
    config = ml_collections.ConfigDict()
    config.stage = args["stage"]
    config.model = for_stage(model, args["stage"], LORA_TARGETS, args["lora_rank"])
    config.mesh = (1, -1, 1)  # (data, fsdp, tensor)
    return config
