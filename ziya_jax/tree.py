"""Parameter trees as {path: leaf} maps, and regex selection of parameters by their '/'-joined path."""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping


def flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, prefix + (k,)))
        return out
    return {prefix: tree}


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def matches(path: tuple[str, ...], patterns: Iterable[str]) -> bool:
    """True if a pattern matches the start of 'a/b/c' (so 'qformer' selects the whole Q-Former)."""
    joined = "/".join(path)
    return any(re.match(f"(?:{p})(?:/|$)", joined) for p in patterns)
