"""LLaVA-style manifests: a JSON list or JSONL file of entries such as
  {"id": "x", "image": "a.jpg" | ["a.jpg", "b.jpg"],
   "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}
or any task schema of `formats` ({"image", "caption"}, {"image", "question", "answer"}, ... with an optional
"task"). Image paths are relative to an image folder and must stay inside it (no absolute paths, `..` or symlinks
out of it) unless `allow_any_image_path`. `ManifestSource` reads the images lazily (a missing file is a counted
bad sample); the TFDS builder stores their bytes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from ziya_jax.data import errors
from ziya_jax.paths import inside

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


def to_record(entry: Mapping, image_dir: str | os.PathLike, allow_any_image_path: bool = False) -> dict:
    """A manifest entry as a pipeline record: {"id", "images": [paths], "annotation": {other fields}}. An image
    path leading out of image_dir raises BadSample (outside_image_dir) unless allow_any_image_path."""
    rec_id = str(entry.get("id", entry.get("_where", "?")))
    image_dir = os.fspath(image_dir)
    annotation = {k: v for k, v in entry.items() if k not in ("id", "image", "images", "_where")}
    paths = []
    for p in image_paths(entry):
        if isinstance(p, str):
            if not allow_any_image_path and not inside(image_dir, p):
                raise errors.BadSample(errors.OUTSIDE_IMAGE_DIR, f"{p!r} leads outside {image_dir or '.'}", rec_id)
            p = os.path.join(image_dir, p)
        paths.append(p)
    return {"id": rec_id, "images": paths, "annotation": annotation}


class ManifestSource:
    """Random-access records of a manifest; images stay paths until the pipeline decodes them.
    `invalid` maps entries that could not be parsed to why (logged). They come after the entries, as records
    the pipeline counts as invalid_entry; so does an entry naming an image outside the image folder, as
    outside_image_dir: every line read is either a sample or a count."""

    def __init__(
        self,
        manifest: str | os.PathLike,
        image_dir: str | os.PathLike | None = None,
        strict: bool = False,
        allow_any_image_path: bool = False,
    ):
        self.manifest = os.fspath(manifest)
        self.image_dir = os.fspath(image_dir) if image_dir is not None else os.path.dirname(self.manifest)
        self.allow_any_image_path = allow_any_image_path
        self.entries, self.invalid = read_manifest(self.manifest, strict)
        self._invalid = list(self.invalid.items())

    def __len__(self) -> int:
        return len(self.entries) + len(self._invalid)

    def __getitem__(self, index: int) -> dict:
        if index >= len(self.entries):
            where, why = self._invalid[index - len(self.entries)]
            return {"id": where, "refused": [errors.INVALID_ENTRY, why]}
        try:
            return to_record(self.entries[index], self.image_dir, self.allow_any_image_path)
        except errors.BadSample as e:
            return {"id": e.source, "refused": [e.reason, e.detail]}

    def __repr__(self) -> str:
        return f"ManifestSource({self.manifest!r}, image_dir={self.image_dir!r}, {len(self)} entries)"
