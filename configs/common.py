"""What the configs share: the LoRA targets and module lists, and the full-size training recipe of Ziya-Visual
(the three stages with their trainable sets, losses, optimizers, data mixtures and evaluation) that
`ziya_chat_14b.py` and `ziya_base_14b.py` instantiate.

A recipe reads everything from two folders the user gives:
- `init`: a `python -m ziya_jax.convert from-hf` output (BLIP-2 or InstructBLIP vision side + Ziya-LLaMA), with
  its `tokenizer/` (Ziya-LLaMA's `tokenizer.model`, bert-base-uncased's `vocab.txt`; `[DEC]` is added on
  loading). Stage 1 starts from it; each later stage starts from the previous stage's model.
- `data_dir`: the manifests that `python -m ziya_jax.data convert` writes from the released files, one folder a
  data set (`DATA_DIR/NAME/train.jsonl`, images in `DATA_DIR/NAME/` unless the source names another folder), and
  the benchmark files that `python -m ziya_jax.evaluate` reads under `DATA_DIR/eval/`.
`smoke=1` keeps every source, stage, loss, trainable set and optimizer setting and changes only sizes (widths,
depths, vocabularies, image size, batch, steps), so a laptop runs the very same recipe on small files.
"""

import ml_collections

from ziya_jax.config import for_stage
from ziya_jax.train.optimizer import default_optimizer

LORA_TARGETS = (
    r"vision_model/layers/self_attn/(qkv|projection)",
    r"language_model/layers/self_attn/(q_proj|k_proj|v_proj|o_proj)",
)
QFORMER = ("qformer", "query_tokens")
STAGE1_HEADS = ("vision_proj", "text_proj", "itm_head", "temp")
# After stage 1 the Q-Former's ITG head (lm_*) stays frozen with the other stage-1 heads; Base's Q-Former sees no
# text then, so it trains only the query side (its text branch would get no gradient, only optimizer state).
QFORMER_BUT_ITG = (r"qformer/(?!lm_)[^/]+", "query_tokens")
QFORMER_QUERY_SIDE = (
    r"qformer/(layernorm|layer/[^/]+/(attention|crossattention|intermediate_query|output_query))",
    "query_tokens",
)

FULL_MODEL = dict(
    vision=dict(image_size=224, patch_size=14, width=1408, depth=39, num_heads=16, mlp_dim=6144, layer_norm_eps=1e-6),
    qformer=dict(
        width=768,
        depth=12,
        num_heads=12,
        mlp_dim=3072,
        cross_attention_frequency=2,
        layer_norm_eps=1e-12,
        vocab_size=30523,  # bert-base-uncased's 30522 pieces + [DEC]
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
    instruction_len=128,
    dtype="bfloat16",
    param_dtype="float32",
    remat_policy="full",
)
# The smoke scale: the same model, every size small (the vocabularies hold a small tokenizer's pieces).
SMOKE_MODEL = dict(
    FULL_MODEL,
    vision=dict(FULL_MODEL["vision"], image_size=28, width=32, depth=2, num_heads=4, mlp_dim=64),
    qformer=dict(
        FULL_MODEL["qformer"], width=32, depth=2, num_heads=4, mlp_dim=64, vocab_size=256, max_position_embeddings=64
    ),
    llm=dict(
        FULL_MODEL["llm"],
        vocab_size=1024,
        width=32,
        depth=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        mlp_dim=64,
        max_position_embeddings=512,
    ),
    num_query_tokens=4,
    image_token_id=1023,
    instruction_len=32,
)

# The data of each stage as (name, task, images): the manifest DATA_DIR/NAME/train.jsonl, the task its records
# make ("auto": each record's own task field), and the image folder under DATA_DIR its paths are relative to
# (the --images given to `python -m ziya_jax.data convert`; "" for DATA_DIR/NAME, where img2dataset and M3IT
# images are written). Stage 1: image-text pairs, English and Chinese (img2dataset output of the user's pair
# sets, and caption sets). Stage 2: captioning, VQA with the translated (T) sets, grounding and grounded
# captioning. Stage 3: conversations, reasoning and detailed description, with the translated (T) sets and the
# BMMIC data (`python -m ziya_jax.data bmmic`). Sources are sampled in proportion to their sizes.
STAGE_DATA = {
    1: (
        ("pairs_en", "caption", ""),
        ("pairs_zh", "caption", ""),
        ("coco_caption", "caption", "coco"),
        ("ai_challenger", "caption", ""),
    ),
    2: (
        ("coco_caption", "caption", "coco"),
        ("flickr30k", "caption", ""),
        ("coco_cn", "caption", "coco"),
        ("ai_challenger", "caption", ""),
        ("vqav2", "vqa", "coco"),
        ("vqav2_t", "vqa", "coco"),
        ("okvqa", "vqa", "coco"),
        ("gqa", "vqa", "gqa"),
        ("gqa_t", "vqa", "gqa"),
        ("textvqa", "vqa", ""),
        ("ocrvqa", "vqa", ""),
        ("refcoco", "auto", "coco"),
        ("refcoco_plus", "auto", "coco"),
        ("refcocog", "auto", "coco"),
        ("visual_genome", "auto", ""),
    ),
    3: (
        ("llava", "conversation", "coco/train2017"),
        ("llava_t", "conversation", "coco/train2017"),
        ("m3it", "conversation", ""),
        ("m3it_t", "conversation", ""),
        ("svit", "conversation", "visual_genome"),
        ("bmmic", "conversation", "coco/train2014"),  # generated from COCO's captions and boxes
    ),
}
# Benchmarks scored at the end of each stage on the released evaluation files under DATA_DIR/eval/ (the full
# tables come from `python -m ziya_jax.evaluate` on the stage's model).
STAGE_EVAL = {
    1: (dict(task="retrieval", data="eval/coco_cn"),),
    2: (dict(task="vqav2", data="eval/vqav2"), dict(task="flickr30k", data="eval/flickr30k")),
    3: (dict(task="vqav2", data="eval/vqav2"), dict(task="flickr30k", data="eval/flickr30k")),
}


def trainable(stage: int, variant: str) -> tuple[str, ...]:
    """Stage 1: the Q-Former and its heads on the frozen ViT and LLM; stage 2: the projection, and for Chat the
    instruction-aware Q-Former; stage 3: the Q-Former and the projection, and for Chat LoRA on the ViT and LLM."""
    if stage == 1:
        return QFORMER + STAGE1_HEADS
    if stage == 2:
        return (QFORMER_BUT_ITG if variant == "chat" else ()) + ("language_projection",)
    if variant == "chat":
        return QFORMER_BUT_ITG + ("language_projection", r".*/lora_[ab]")
    return QFORMER_QUERY_SIDE + ("language_projection",)


def stage_config(stage: int, variant: str, *, smoke: bool, data_dir: str, init: str, lora_rank: int, alone: bool):
    """One stage of the full-size recipe (sizes shrunk when smoke). It starts from `init` when it is stage 1 or
    runs alone (fine-tuning a converted model); in the three-stage run, stages 2 and 3 start from the stage before."""
    config = ml_collections.ConfigDict()
    config.stage = stage
    config.model = for_stage(
        dict(SMOKE_MODEL if smoke else FULL_MODEL, variant=variant), stage, LORA_TARGETS, lora_rank
    )
    sources = [
        dict(kind="manifest", name=name, task=task, weight="size", **({"images": images} if images else {}))
        for name, task, images in STAGE_DATA[stage]
    ]
    # Global batch and sequence lengths: BLIP-2 captions are 32 Q-Former tokens; instruction rows hold the image
    # queries and the conversation. Stage 1's batch of 2048 is 32 accumulated steps of 64 rows (a pod with more
    # chips raises batch_size and lowers grad_accum_steps).
    rows = dict(batch_size=8, text_len=96) if smoke else dict(batch_size=64, text_len=512)
    config.data = dict(
        data_dir=data_dir,
        tokenizers=f"{init}/tokenizer" if init else "",
        sources=sources,
        max_images=1,
        num_workers=0 if smoke else 8,
        seed=stage,
        **rows,
    )
    if stage == 1:
        config.data.qformer_text_len = 32
    steps = 2 if smoke else 90000
    optimizer = default_optimizer(total_steps=steps)
    if stage == 1:
        optimizer.grad_accum_steps = 2 if smoke else 32
    if smoke:
        optimizer.warmup_steps = 1
    config.train = dict(
        # [DEC], appended to bert-base-uncased's pieces, is the Q-Former vocabulary's last id (training takes it
        # from the tokenizer; `compile` reads it here)
        dec_token_id=config.model["qformer"]["vocab_size"] - 1,
        trainable=trainable(stage, variant),
        losses=dict(itc=1.0, itm=1.0, itg=1.0) if stage == 1 else dict(lm=1.0),
        optimizer=optimizer,
        init_from=init if stage == 1 or alone else "",
        frozen_dtype="bfloat16",  # what does not train is only read, in bf16 compute: half its memory
        seed=stage,
    )
    config.checkpoint = dict(save_every=2 if smoke else 1000, keep=2, async_save=True)
    limit = 4 if smoke else 1000
    config.eval = dict(
        every=0,
        n=0,
        batch_size=8 if smoke else 64,
        tasks=(),
        show=0,
        benchmarks=[dict(b, limit=limit) for b in STAGE_EVAL[stage]],
    )
    config.log_every = 1 if smoke else 50
    # (data, fsdp, tensor): fully sharded data parallel inside a slice (ICI), data parallel across slices (DCN).
    config.mesh = dict(ici=(1, -1, 1), dcn=(-1, 1, 1))
    return config


def recipe(variant: str, args: dict) -> ml_collections.ConfigDict:
    """`stage=all` (the default): the three stages in turn, each in WORKDIR/stageN; `stage=N`: that one."""
    alone = args["stage"] != "all"
    make = lambda s: stage_config(
        s,
        variant,
        smoke=args["smoke"],
        data_dir=args["data_dir"],
        init=args["init"],
        lora_rank=args["lora_rank"],
        alone=alone,
    )
    if alone:
        if args["stage"] not in ("1", "2", "3"):
            raise ValueError(f"stage={args['stage']!r}: choose 1, 2, 3 or all")
        return make(int(args["stage"]))
    config = ml_collections.ConfigDict()
    config.stages = {f"stage{s}": make(s) for s in (1, 2, 3)}
    return config
