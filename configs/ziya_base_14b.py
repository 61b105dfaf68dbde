"""Ziya-Visual-Base, full size: the Chat recipe with a Q-Former that sees no instruction (BLIP-2 style), trained
in the paper's three stages (configs/common.py has the recipe).

Usage: --config configs/ziya_base_14b.py:init=WEIGHTS,data_dir=DATA[,stage=1|2|3][,smoke=1].
"""

from ziya_jax.config import parse_arg, sibling

common = sibling(__file__, "common")


def get_config(arg=None):
    return common.recipe("base", parse_arg(arg, stage="all", smoke=False, data_dir="data", init="", lora_rank=8))
