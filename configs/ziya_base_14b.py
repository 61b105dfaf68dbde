"""Ziya-Visual-Base, full size: the Chat config with variant=base (Q-Former sees no instruction).

Usage: --config configs/ziya_base_14b.py:stage=2 (stage 1, 2 or 3).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "ziya_chat_14b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ziya_chat_14b.py"))
_chat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_chat)


def get_config(arg=None):
    return _chat.get_config(",".join(filter(None, ["variant=base", arg or ""])))
