"""The one rule for files that data names (a checkpoint's shards, an annotation's images): they stay inside
the folder that holds them."""

from __future__ import annotations

import os


def inside(root: str, path: str) -> bool:
    """Whether `path` (a relative one taken from `root`) resolves, symlinks followed, to `root` or below it.
    Decided from names alone, without opening anything: a `../x`, an absolute path or a symlink out of `root`
    would otherwise let a downloaded file make us read any file the user can. A name no file can have (a NUL
    byte) is not inside either."""
    root = os.path.realpath(root)
    try:
        return os.path.commonpath([root, os.path.realpath(os.path.join(root, path))]) == root
    except ValueError:
        return False
