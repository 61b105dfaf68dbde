"""Symbolic representations of images, read from the files they are released (or produced) in, and merged per
image into `Scene`s: captions and tagged boxes.

- COCO captions (`coco`): {images: [{id, file_name, width?, height?}], annotations: [{image_id, caption}]};
  the image is file_name.
- Karpathy split (`karpathy`): dataset_*.json, {images: [{filename, filepath?, split, sentences: [{raw}]}]};
  the image is [filepath/]filename.
- AI Challenger captions (`aic`): [{image_id: "NAME.jpg", caption: [sentences], url?}]; the image is image_id.
- COCO instances (boxes, `coco`): {images: [...], annotations: [{image_id, category_id, bbox: [x, y, w, h]}],
  categories: [{id, name}]}.
- A detector's JSON lines (boxes, `detector`), e.g. Grounded-SAM boxes for RAM tags: one {image, label,
  box: [x1, y1, x2, y2] in pixels, score, width?, height?} per line.

Captions and boxes of the same image path are merged. Boxes are kept in pixels and written in the 0..999
convention of `ziya_jax.data.formats` when a prompt is made; an image without width and height in its file
has them read from the image's header (`--image-dir`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

from ziya_jax.data import formats
from ziya_jax.data.annotations import field, load_json

CAPTION_FORMATS = ("coco", "karpathy", "aic")
BOX_FORMATS = ("coco", "detector")


@dataclasses.dataclass
class Box:
    label: str
    box: tuple[float, float, float, float]  # pixels x1, y1, x2, y2
    score: float | None = None


@dataclasses.dataclass
class Scene:
    image: str  # path relative to the image folder
    width: int | None = None
    height: int | None = None
    captions: list[str] = dataclasses.field(default_factory=list)
    boxes: list[Box] = dataclasses.field(default_factory=list)

    @property
    def tags(self) -> list[str]:
        """The labels of the scene's boxes, each once, in order."""
        return list(dict.fromkeys(b.label for b in self.boxes))

    def objects(self) -> list[dict]:
        """Boxes as {label, box} with the box in the 0..999 convention."""
        return [
            {"label": b.label, "box": list(formats.normalize_box(b.box, self.width, self.height))} for b in self.boxes
        ]


def _coco_images(data: dict, path: str) -> dict:
    return {field(img, "id", path): img for img in field(data, "images", path)}


def read_captions(path: str, fmt: str) -> dict[str, Scene]:
    """Captions per image path from a caption file of format `fmt` (CAPTION_FORMATS)."""
    data = load_json(path)
    scenes: dict[str, Scene] = {}
    if fmt == "coco":
        images = _coco_images(data, path)
        for ann in field(data, "annotations", path):
            img = images.get(field(ann, "image_id", path))
            if img is None:
                raise ValueError(f"{path}: caption of unknown image {ann['image_id']}")
            scene = scenes.setdefault(img["file_name"], Scene(img["file_name"], img.get("width"), img.get("height")))
            scene.captions.append(field(ann, "caption", path).strip())
    elif fmt == "karpathy":
        for img in field(data, "images", path):
            name = field(img, "filename", path)
            rel = os.path.join(img["filepath"], name) if img.get("filepath") else name
            scene = scenes.setdefault(rel, Scene(rel))
            scene.captions += [field(s, "raw", path).strip() for s in field(img, "sentences", path)]
    elif fmt == "aic":
        if not isinstance(data, list):
            raise ValueError(f"{path}: an AI Challenger caption file is a list of {{image_id, caption}}")
        for item in data:
            name = field(item, "image_id", path)
            captions = field(item, "caption", path)
            scene = scenes.setdefault(name, Scene(name))
            scene.captions += [c.strip() for c in ([captions] if isinstance(captions, str) else captions)]
    else:
        raise ValueError(f"caption format {fmt!r}; known: {list(CAPTION_FORMATS)}")
    return scenes


def read_boxes(path: str, fmt: str, min_score: float = 0.0) -> dict[str, Scene]:
    """Tagged boxes per image path from a COCO instances file or a detector's JSON lines (`fmt`: BOX_FORMATS);
    detector boxes scoring under min_score are dropped."""
    scenes: dict[str, Scene] = {}
    if fmt == "coco":
        data = load_json(path)
        images = _coco_images(data, path)
        names = {field(c, "id", path): field(c, "name", path) for c in field(data, "categories", path)}
        for img in images.values():  # an image with no boxes is still a scene (its captions may have objects)
            scenes[img["file_name"]] = Scene(img["file_name"], img.get("width"), img.get("height"))
        for ann in field(data, "annotations", path):
            img = images.get(field(ann, "image_id", path))
            if img is None:
                raise ValueError(f"{path}: box of unknown image {ann['image_id']}")
            x, y, w, h = field(ann, "bbox", path)
            scenes[img["file_name"]].boxes.append(Box(names[field(ann, "category_id", path)], (x, y, x + w, y + h)))
    elif fmt == "detector":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    item = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{where}: not JSON: {e}") from None
                score = item.get("score")
                if score is not None and score < min_score:
                    continue
                name = field(item, "image", where)
                scene = scenes.setdefault(name, Scene(name, item.get("width"), item.get("height")))
                box = field(item, "box", where)
                if len(box) != 4:
                    raise ValueError(f"{where}: box {box} is not [x1, y1, x2, y2]")
                scene.boxes.append(Box(field(item, "label", where), tuple(box), score))
    else:
        raise ValueError(f"box format {fmt!r}; known: {list(BOX_FORMATS)}")
    return scenes


def merge(parts: Iterable[dict[str, Scene]]) -> list[Scene]:
    """One scene per image path (captions and boxes of every part), sorted by path."""
    merged: dict[str, Scene] = {}
    for part in parts:
        for name, s in part.items():
            m = merged.setdefault(name, Scene(name))
            m.width, m.height = m.width or s.width, m.height or s.height
            m.captions += s.captions
            m.boxes += s.boxes
    return [merged[k] for k in sorted(merged)]


def fill_sizes(scenes: Sequence[Scene], image_dir: str | None) -> None:
    """Width and height from the image header where the inputs did not give them (boxes need them)."""
    from PIL import Image

    for s in scenes:
        if s.boxes and not (s.width and s.height):
            if image_dir is None:
                raise ValueError(f"{s.image}: its boxes need the image size; pass --image-dir")
            with Image.open(os.path.join(image_dir, s.image)) as im:
                s.width, s.height = im.size


def read_scenes(
    captions: Sequence[tuple[str, str]], boxes: Sequence[tuple[str, str]], image_dir: str | None, min_score: float
) -> list[Scene]:
    """captions, boxes: (format, path) pairs -> merged scenes with sizes known, sorted by image path."""
    scenes = merge([read_captions(p, f) for f, p in captions] + [read_boxes(p, f, min_score) for f, p in boxes])
    fill_sizes(scenes, image_dir)
    return scenes
