"""Ziya-Visual-Chat, full size: EVA ViT-g (39 layers) + instruction-aware Q-Former + Ziya-LLaMA-13B, trained in the
paper's three stages (configs/common.py has the recipe).

Usage: --config configs/ziya_chat_14b.py:init=WEIGHTS,data_dir=DATA runs stages 1, 2 and 3 in turn
(WORKDIR/stage1, stage2, stage3); add stage=1|2|3 for one of them, smoke=1 for the same recipe at tiny sizes,
lora_rank=N for stage 3's LoRA (default 8). WEIGHTS is a `convert from-hf` output, DATA the manifests' folder.
"""

from ziya_jax.config import parse_arg, sibling

common = sibling(__file__, "common")


def get_config(arg=None):
    return common.recipe("chat", parse_arg(arg, stage="all", smoke=False, data_dir="data", init="", lora_rank=8))
