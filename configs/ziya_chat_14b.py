"""Ziya-Visual-Chat, full size: EVA ViT-g (39 layers) + instruction-aware Q-Former + Ziya-LLaMA-13B.

Usage: --config configs/ziya_chat_14b.py:stage=3 (stage 1, 2 or 3; variant=base gives the Base model).
What trains follows the paper: stage 1 the Q-Former and its ITC/ITM/ITG heads on a frozen ViT; stage 2 the
projection (Base) or the instruction-aware Q-Former and the projection (Chat); stage 3 the Q-Former and the
projection, plus LoRA on the ViT and LLM attention for Chat. The optimizer is the paper's.
"""

import ml_collections

from ziya_jax.config import for_stage, parse_arg
from ziya_jax.train.optimizer import default_optimizer

LORA_TARGETS = (
    r"vision_model/layers/self_attn/(qkv|projection)",
    r"language_model/layers/self_attn/(q_proj|k_proj|v_proj|o_proj)",
)
QFORMER = ("qformer", "query_tokens")
STAGE1_HEADS = ("vision_proj", "text_proj", "itm_head", "temp")
DEC_TOKEN_ID = 30522  # [DEC], appended to bert-base-uncased's 30522 pieces (Q-Former vocabulary 30523)


def trainable(stage: int, variant: str) -> tuple[str, ...]:
    if stage == 1:
        return QFORMER + STAGE1_HEADS
    if stage == 2:
        return (QFORMER if variant == "chat" else ()) + ("language_projection",)
    return QFORMER + ("language_projection",) + ((r".*/lora_[ab]",) if variant == "chat" else ())


def get_config(arg=None):
    args = parse_arg(arg, stage=3, variant="chat", lora_rank=8)
    model = dict(
        variant=args["variant"],
        vision=dict(
            image_size=224, patch_size=14, width=1408, depth=39, num_heads=16, mlp_dim=6144, layer_norm_eps=1e-6
        ),
        qformer=dict(
            width=768,
            depth=12,
            num_heads=12,
            mlp_dim=3072,
            cross_attention_frequency=2,
            layer_norm_eps=1e-12,
            vocab_size=30523,
            max_position_embeddings=512,
        ),
        llm=dict(
            vocab_size=39424,
            width=5120,
            depth=40,
            num_heads=40,
            num_kv_heads=40,
            head_dim=128,
            mlp_dim=13824,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=2048,
        ),
        num_query_tokens=32,
        image_token_id=39423,
        dtype="bfloat16",
        param_dtype="float32",
        remat_policy="full",
    )
    config = ml_collections.ConfigDict()
    config.stage = args["stage"]
    config.model = for_stage(model, args["stage"], LORA_TARGETS, args["lora_rank"])
    stage1 = args["stage"] == 1
    # Global batch and sequence lengths: BLIP-2 captions are 32 Q-Former tokens; instruction rows hold the
    # 32 image queries and the conversation; the Chat Q-Former reads model.instruction_len (128) tokens.
    config.data = dict(batch_size=64, text_len=512, max_images=1)
    if stage1:
        config.data.qformer_text_len = 32
    config.train = dict(
        trainable=trainable(args["stage"], args["variant"]),
        losses=dict(itc=1.0, itm=1.0, itg=1.0) if stage1 else dict(lm=1.0),
        dec_token_id=DEC_TOKEN_ID,
        frozen_dtype="bfloat16",  # what does not train is only read, in bf16 compute: half its memory
        optimizer=default_optimizer(),
    )
    # (data, fsdp, tensor): fully sharded data parallel inside a slice (ICI), data parallel across slices (DCN).
    config.mesh = dict(ici=(1, -1, 1), dcn=(-1, 1, 1))
    return config
