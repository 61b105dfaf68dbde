"""The demo: a tiny Ziya-Visual trained from scratch through the three stages on the bundled synthetic set.

Usage: --config configs/demo.py[:variant=base|chat] trains stages 0, 1 (in two parts: 1a, ITG alone, then 1b,
the paper's three losses), 2 and 3 in turn (each in WORKDIR/stage<name>, each starting from the previous one's
model); --config configs/demo.py:stage=0|1a|1b|2|3[,variant=...] is one of them.
Stage 0 stands in for the pretrained EVA-CLIP tower the paper starts from: it trains the ViT to read each grid
cell's colour, shape and size (ziya_jax.train.vision), and stage 1 then keeps it frozen, as the paper does.
The LLM vocabulary is the demo tokenizer's 640 pieces (trained into WORKDIR/tokenizers when missing) plus the
image placeholder (id 640); the Q-Former's is the demo Q-Former tokenizer's 640 (at 512 it cuts English words into
letters, "large" into 5 pieces, and stage 1b's English retrieval IR@1 is 35.5; at 640, 66.5). Everything trains
from scratch here, so the stages unfreeze what they must: stage 1 the Q-Former (ITC/ITM/ITG on captions) on the
frozen stage-0 ViT, stage 2 the LLM and projection (and Chat's instruction-aware Q-Former, as in the paper) on the
frozen ViT (instructions), stage 3 the Q-Former and projection plus LoRA on the ViT and LLM attention, as in the
paper's stage 3. The LLM has 2 layers: on an H200, 2 layers learn stage 2's VQA as fast per step as 4, and on
2 CPU cores a step of 32 unpacked rows costs 0.3 s instead of 0.45 s. Its 16 heads of 16 learn VQA faster than
8 of 32 or 4 of 64 (stage 2 alone, 1800 steps: 88.5/91.0, 83.5/82.5, 79.5/79.0), for ~20% more time a step;
its MLP is 512 wide, where 768 costs 12% more a stage-2 step.
Stages 2 and 3 pack their rows (PACKED_ROWS below), which buys stage 2 ~1.4x the examples in the same time.
Trained by stage 1's objectives instead of stage 0, the ViT learns colours but not shapes or sizes, and the demo's
VQA stays near 52/50 (en/zh) with shape, position and yes/no questions at chance.

Stage 1 trains ITG alone first (1a), then the paper's three losses together (1b). Trained from scratch with ITC
beside it from the start, the Q-Former's queries become summaries of the whole image, and ITG predicts a
caption's colours, shapes and positions from the bag of objects, not from which cell holds what (per-token loss of
colour words ~1.6-1.9 nats, chance 1.8); the LLM then cannot tell which object is where either. ITG alone teaches
the queries where each object is (colour and position words ~0.15-0.4), and the short joint part after it adds
ITC/ITM with the Q-Former at a tenth of the rate, so that it keeps that.

Initialisation: with the usual normal(0.02) everywhere the Q-Former's queries cannot learn which cell of the
image holds what. The ViT's patch embeddings (768 pixels -> 128) are ~25x larger than 0.02 positions, so attention
over its tokens is all content, and the 0.02 weights of a 128-wide Q-Former pass on ~5% image-dependent signal.
Positions drawn at std 1.0 and Q-Former/LLM weights at ~1/sqrt(width) fix both; a probe reading every cell's
colour from the queries then learns in ~200 steps instead of not at all.

docs/demo.md has these findings in full, with the commands that reproduce them.
"""

import ml_collections

from ziya_jax.config import for_stage, parse_arg, sibling
from ziya_jax.train.optimizer import default_optimizer

common = sibling(__file__, "common")
LORA_TARGETS, QFORMER, STAGE1_HEADS = common.LORA_TARGETS, common.QFORMER, common.STAGE1_HEADS
TRAINABLE = {
    1: QFORMER + STAGE1_HEADS,
    2: ("language_model", "language_projection"),  # + the Q-Former for Chat (instruction-aware), as in the paper
    3: QFORMER + ("language_projection", r".*/lora_[ab]"),
}
# Once stage 1a has trained it, the Q-Former learns slower than the fresh modules beside it: at the full rate, the
# fresh LLM's first gradients wipe out what ITG taught it. Stages 1b and 3 train it at a tenth of the rate, Chat's
# stage 2 at half (VQA en/zh after stage 2 alone, 1800 packed steps, 4 LLM heads: a tenth 71.5/68.0, 0.3 78.5/78.0,
# half 79.5/79.0; the full rate 42.0/51.0 at step 900; docs/demo.md).
QFORMER_LR = {1: 0.1, 2: 0.5, 3: 0.1}
# Instruction mixtures (task, weight) on the synthetic train split; VQA leads, as it is what the demo is scored on.
MIXTURE = {
    2: (("vqa", 4.0), ("caption", 1.0), ("grounding", 1.0), ("conversation", 1.0)),
    3: (("vqa", 3.0), ("grounding", 1.5), ("grounded_caption", 1.0), ("caption", 0.5), ("conversation", 1.0)),
}
# Stages 2 and 3 pack their rows (ziya_jax.data.pipeline): 8 rows of 128 tokens and 4 image slots hold ~30
# examples. With 4 LLM heads a step costs ~0.19 s on 2 CPU cores, where 32 unpacked rows of 64 tokens (half of
# it padding) cost ~0.3 s. 12 rows of 96 tokens and 3 slots hold ~34 examples but cost ~14% more a step.
PACKED_ROWS = dict(pack=True, batch_size=8, text_len=128, max_images=4)
# Chat's Q-Former instruction in stages 2 and 3: every single question fits in 16 Q-Former tokens with [CLS] and
# [SEP]; a conversation's several questions keep their last ones (left truncation). 32 cost ~7% more a step.
QFORMER_INSTRUCTION_LEN = 16
# Stage 2 is where VQA is learnt, and VQA keeps rising with the examples seen. On an H200, stage 2 alone from one
# stage-1b model (VQA en/zh on 500 test questions a language) reached 88.2/88.2 after 1700 steps, 87.4/90.4 and
# 90.8/92.2 after 2000 (two seeds) and 96.0/95.4 after 2400; yes/no questions are learnt last.
STEPS = {0: 400, 1: 150, 2: 2400, 3: 100}
ITG_STEPS = 700  # stage 1a, ITG alone: ~0.1 s a step against ~0.35 with ITC; its loss ends at 1.031 (900: 1.029)
LR = {0: 1e-3, 1: 1e-3, 2: 1e-3, 3: 5e-4}
EVAL_TASKS = {1: ("retrieval",), 2: (), 3: ("vqa", "caption", "grounding")}


def model_config(variant: str) -> dict:
    return dict(
        variant=variant,
        vision=dict(
            image_size=48, patch_size=16, width=128, depth=4, num_heads=4, mlp_dim=512, position_initializer_range=1.0
        ),
        qformer=dict(
            width=128,
            depth=2,
            num_heads=4,
            mlp_dim=512,
            cross_attention_frequency=1,
            vocab_size=640,
            max_position_embeddings=64,
            embed_dim=64,
            dropout=0.0,
            initializer_range=0.08,
        ),
        llm=dict(
            vocab_size=641,
            width=256,
            depth=2,
            num_heads=16,
            num_kv_heads=16,
            head_dim=16,
            mlp_dim=512,
            max_position_embeddings=256,
            initializer_range=0.0625,
        ),
        num_query_tokens=8,
        image_token_id=640,
        instruction_len=QFORMER_INSTRUCTION_LEN,
        scan_unroll=4,  # every tower's layers as straight-line code: a stage-2 step is 13% faster on 2 CPU cores
    )


def optimizer(stage: int, steps: int, lr_multipliers=()) -> ml_collections.ConfigDict:
    return default_optimizer(
        lr=LR[stage],
        warmup_init_lr=1e-5,
        warmup_steps=min(30, steps // 5),
        total_steps=steps,
        end_lr=LR[stage] / 10,
        b2=0.98,
        weight_decay=0.01,
        grad_clip=1.0,
        lr_multipliers=lr_multipliers,
    )


def vision_config(variant: str, lora_rank: int) -> ml_collections.ConfigDict:
    """Stage 0: the ViT learns every grid cell's colour, shape and size; written into the model stage 1 uses."""
    config = ml_collections.ConfigDict()
    config.stage = 0
    config.kind = "vision"
    config.model = for_stage(model_config(variant), 1, LORA_TARGETS, lora_rank)
    config.data = dict(split="train", n=20000, batch_size=32, seed=0, eval_n=500)
    config.train = dict(optimizer=optimizer(0, STEPS[0]), seed=0)
    config.log_every = 5
    return config


def stage_config(stage: int, variant: str, lora_rank: int) -> ml_collections.ConfigDict:
    if stage == 0:
        return vision_config(variant, lora_rank)
    config = ml_collections.ConfigDict()
    config.stage = stage
    config.model = for_stage(model_config(variant), stage, LORA_TARGETS, lora_rank)
    train_split = dict(kind="synthetic", split="train", n=20000)
    mixture = (
        [dict(train_split, task="caption", weight=1.0)]
        if stage == 1
        else [dict(train_split, task=t, weight=w) for t, w in MIXTURE[stage]]
    )
    rows = dict(batch_size=32, text_len=64, max_images=1) if stage == 1 else PACKED_ROWS
    config.data = dict(tokenizers="demo", sources=mixture, **rows, num_workers=0, seed=stage)
    if stage == 1:
        config.data.qformer_text_len = 32  # BLIP-2's caption length; Chat's instruction is model.instruction_len
    config.train = dict(
        trainable=TRAINABLE[stage] + (QFORMER if stage == 2 and variant == "chat" else ()),
        losses=dict(itc=1.0, itm=1.0, itg=1.0) if stage == 1 else dict(lm=1.0),
        optimizer=optimizer(stage, STEPS[stage], tuple((name, QFORMER_LR[stage]) for name in QFORMER)),
        init_from="",
        frozen_dtype="",  # float32 compute on a CPU: keep the frozen weights as they are
        seed=stage,
    )
    config.checkpoint = dict(save_every=50, keep=2, async_save=True)
    config.eval = dict(every=0, n=200, batch_size=50, tasks=EVAL_TASKS[stage], show=3 if stage == 3 else 0)
    config.log_every = 5
    config.mesh = (-1, 1, 1)
    return config


def itg_config(variant: str, lora_rank: int) -> ml_collections.ConfigDict:
    """Stage 1a: the Q-Former learns ITG alone (see the module docstring)."""
    config = stage_config(1, variant, lora_rank)
    config.train.losses = dict(itg=1.0)
    config.train.optimizer = optimizer(1, ITG_STEPS)
    config.eval.tasks = ()
    return config


def get_config(arg=None):
    args = parse_arg(arg, stage="all", variant="chat", lora_rank=8)
    v, r = args["variant"], args["lora_rank"]
    stages = {
        "0": lambda: stage_config(0, v, r),
        "1a": lambda: itg_config(v, r),
        "1b": lambda: stage_config(1, v, r),
        "2": lambda: stage_config(2, v, r),
        "3": lambda: stage_config(3, v, r),
    }
    if args["stage"] != "all":
        if args["stage"] not in stages:
            raise ValueError(f"unknown demo stage {args['stage']!r}; known: {list(stages)}")
        return stages[args["stage"]]()
    config = ml_collections.ConfigDict()
    config.stages = {f"stage{name}": make() for name, make in stages.items()}  # run in name order (sorted keys)
    return config
