"""Ziya-Visual-Base, full size: the Chat config with variant=base (the Q-Former sees no instruction).

Usage: --config configs/ziya_base_14b.py:stage=2 (stage 1, 2 or 3).
"""

import os

from ziya_jax.config import load_config

_CHAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ziya_chat_14b.py")


def get_config(arg=None):
    return load_config(f"{_CHAT}:" + ",".join(filter(None, ["variant=base", arg or ""])))
