"""The demo: a tiny Ziya-Visual trained from scratch through the three stages on the bundled synthetic set.

Usage: --config configs/demo.py:stage=1|2|3[,variant=base|chat]. The LLM vocabulary is the demo tokenizer's
1024 pieces (python -m ziya_jax.data tokenizers) plus the image placeholder (id 1024); the Q-Former's is the demo
Q-Former tokenizer's 512. Everything trains from scratch here, so the stages unfreeze what they must: stage 1 the
ViT with the Q-Former, stage 2 the LLM with the projection (and the Chat Q-Former), stage 3 the Q-Former and
projection plus LoRA on the ViT and LLM attention, as in the paper's stage 3.
"""
import ml_collections

from ziya_jax.config import for_stage, parse_arg
from ziya_jax.train.optimizer import default_optimizer

LORA_TARGETS = (r"vision_model/layers/self_attn/(qkv|projection)",
                r"language_model/layers/self_attn/(q_proj|k_proj|v_proj|o_proj)")
STAGE1_HEADS = ("vision_proj", "text_proj", "itm_head", "temp")


def trainable(stage: int, variant: str) -> tuple:
    qformer = ("qformer", "query_tokens")
    if stage == 1:
        return ("vision_model",) + qformer + STAGE1_HEADS
    if stage == 2:
        return ("language_model", "language_projection") + (qformer if variant == "chat" else ())
    return qformer + ("language_projection", r".*/lora_[ab]")


def get_config(arg=None):
    args = parse_arg(arg, stage=2, variant="chat", lora_rank=8)
    stage, variant = args["stage"], args["variant"]
    model = dict(
        variant=variant,
        vision=dict(image_size=64, patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=512),
        qformer=dict(width=128, depth=2, num_heads=4, mlp_dim=512, cross_attention_frequency=1, vocab_size=512,
                     max_position_embeddings=64, embed_dim=64, dropout=0.0),
        llm=dict(vocab_size=1025, width=256, depth=4, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=768,
                 max_position_embeddings=256),
        num_query_tokens=16,
        image_token_id=1024,
    )
    config = ml_collections.ConfigDict()
    config.stage = stage
    config.model = for_stage(model, stage, LORA_TARGETS, args["lora_rank"])
    config.data = dict(batch_size=32, text_len=96, image_size=64, max_images=1,
                       qformer_text_len=32 if (stage == 1 or variant == "chat") else 0, num_workers=0)
    config.train = dict(
        trainable=trainable(stage, variant),
        losses=dict(itc=1.0, itm=1.0, itg=1.0) if stage == 1 else dict(lm=1.0),
        optimizer=default_optimizer(lr=1e-3, warmup_init_lr=1e-5, warmup_steps=50, total_steps=1000, end_lr=1e-4,
                                    b2=0.98, weight_decay=0.01, grad_clip=1.0),
    )
    config.mesh = (-1, 1, 1)
    return config
