"""LLaVA-style manifests: a JSON list or JSONL file of entries such as
  {"id": "x", "image": "a.jpg" | ["a.jpg", "b.jpg"],
   "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}
or any task schema of `formats` ({"image", "caption"}, {"image", "question", "answer"}, ... with an optional
"task"). Image paths are relative to an image folder. `ManifestSource` reads the images lazily (a missing file
is a counted bad sample); the TFDS builder stores their bytes.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)


def read_manifest(path: str | os.PathLike, strict: bool = False) -> tuple[list[dict], dict[str, str]]:
    """(entries, {"file:line": why} for entries that are not JSON objects). Strict raises on the first one.
    A `.json` file is one list; anything else is read as JSON lines (blank lines ignored)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    entries, invalid = [], {}
    if path.endswith(".json"):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json manifest must be a list of entries, got {type(items).__name__}")
        numbered = [(f"{path}:[{i}]", item) for i, item in enumerate(items)]
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{path}:{n}", json.loads(line)))
            except ValueError as e:
                invalid[f"{path}:{n}"] = f"not JSON: {e}"
    for where, item in numbered:
        if isinstance(item, Mapping):
            entries.append({"_where": where, **item})
        else:
            invalid[where] = f"not a JSON object: {item!r:.60}"
    if invalid:
        if strict:
            where, why = next(iter(invalid.items()))
            raise ValueError(f"{where}: {why}")
        log.warning("%s: skipped %d invalid entries, e.g. %s", path, len(invalid), next(iter(invalid.items())))
    return entries, invalid


def image_paths(entry: Mapping) -> list[str]:
    images = entry.get("images", entry.get("image", []))
    return [images] if isinstance(images, str) else list(images)


def to_record(entry: Mapping, image_dir: str | os.PathLike) -> dict:
    """A manifest entry as a pipeline record: {"id", "images": [paths], "annotation": {other fields}}."""
    rec_id = str(entry.get("id", entry.get("_where", "?")))
    annotation = {k: v for k, v in entry.items() if k not in ("id", "image", "images", "_where")}
    paths = [p if not isinstance(p, str) else os.path.join(os.fspath(image_dir), p) for p in image_paths(entry)]
    return {"id": rec_id, "images": paths, "annotation": annotation}


class ManifestSource:
    """Random-access records of a manifest; images stay paths until the pipeline decodes them.
    `invalid` maps entries that could not be parsed to why (they are left out, and logged)."""

    def __init__(self, manifest: str | os.PathLike, image_dir: str | os.PathLike | None = None, strict: bool = False):
        self.manifest = os.fspath(manifest)
        self.image_dir = os.fspath(image_dir) if image_dir is not None else os.path.dirname(self.manifest)
        self.entries, self.invalid = read_manifest(self.manifest, strict)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        return to_record(self.entries[index], self.image_dir)

    def __repr__(self) -> str:
        return f"ManifestSource({self.manifest!r}, image_dir={self.image_dir!r}, {len(self)} entries)"
