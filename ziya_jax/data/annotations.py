"""What the readers of released annotation files share, the benchmark readers (ziya_jax.evaluate) and the
training-set converters (ziya_jax.data.released) alike: JSON loading, checked field access, and the layouts that
several releases use (COCO image names, Karpathy's split files, `IMAGE#k<TAB>caption` lines)."""

from __future__ import annotations

import json
import os
import re


def load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def field(record, key: str, where: str, kind: type | tuple[type, ...] = object):
    """record[key], which must be there and be of `kind`."""
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(record[key], kind):
        want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where}: field {key!r} is {type(record[key]).__name__} {record[key]!r:.40}, want {want}")
    return record[key]


def karpathy_image(img, where: str) -> tuple[str, list[str]]:
    """One image of Karpathy's dataset_*.json -> (its path under the images folder, its raw sentences)."""
    name = field(img, "filename", where, str)
    rel = os.path.join(field(img, "filepath", where, str), name) if img.get("filepath") else name
    return rel, [field(s, "raw", where, str) for s in field(img, "sentences", where, list)]


def tsv_caption(line: str, where: str) -> tuple[str, str]:
    """An `IMAGE#k<TAB>caption` line -> (IMAGE without .jpg, the caption stripped, possibly empty)."""
    key, tab, caption = line.rstrip("\n").partition("\t")
    if not tab:
        raise ValueError(f"{where}: expected IMAGE#k<TAB>caption, got {line.strip()[:60]!r}")
    return re.sub(r"\.jpg$", "", key.split("#")[0]), caption.strip()


def coco_candidates(name: str) -> list[str]:
    """Where a COCO image file lies under an images folder: there, or in the folder its name starts with
    (COCO_val2014_*.jpg in val2014/)."""
    subset = re.match(r"COCO_([^_]+)_", name)
    return [name, os.path.join(subset.group(1), name)] if subset else [name]
