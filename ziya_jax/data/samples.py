"""Sample preparation: a record of any source (a dict, a manifest entry, TFDS's bytes and JSON, a synthetic scene)
-> one model-ready row (an instruction row or an image-caption pair), or a skip marker that says why; it never
raises, so one bad sample never ends a run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grain
import numpy as np

from ziya_jax.data import errors, formats, images, synthetic

if TYPE_CHECKING:
    from ziya_jax.data.pipeline import DataConfig

AUTO = "auto"  # the task comes from the record: its "task" field, or the fields it has
BOX_TASKS = ("grounding", "grounded_caption")


class TagTask(grain.transforms.Map):
    def __init__(self, task: str):
        self.task = task

    def map(self, record):
        return record, self.task


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def record_fields(record: Mapping) -> tuple[str, list, dict]:
    """(id, image sources, annotation) of a record from any source: a dict, or TFDS's bytes and JSON."""
    if not isinstance(record, Mapping):
        raise errors.BadSample(errors.BAD_ANNOTATION, f"record of type {type(record).__name__}")
    rec_id = _text(record.get("id", "?"))
    if "refused" in record:  # [reason, detail] from a source that could not make the record (see ManifestSource)
        raise errors.BadSample(*record["refused"], rec_id)
    ann = record.get("annotation", {})
    if isinstance(ann, (bytes, np.bytes_, str)):
        try:
            ann = json.loads(_text(ann))
        except ValueError as e:
            raise errors.BadSample(errors.BAD_ANNOTATION, f"annotation is not JSON: {e}", rec_id) from None
    if not isinstance(ann, Mapping):
        raise errors.BadSample(errors.BAD_ANNOTATION, f"annotation of type {type(ann).__name__}", rec_id)
    imgs = record.get("images", [])
    if isinstance(imgs, (str, bytes)):
        imgs = [imgs]
    return rec_id, list(imgs), dict(ann)


def infer_task(ann: Mapping) -> str:
    """A record's task: its "task" field, else what its fields imply (box tasks must say which)."""
    if "task" in ann:
        return _text(ann["task"])
    for field, task in (("conversations", "conversation"), ("question", "vqa"), ("caption", "caption")):
        if field in ann:
            return task
    raise errors.BadSample(errors.UNKNOWN_TASK, f"no 'task' field and no known fields in {sorted(ann)}")


def _skipped(rec_id: str, e: Exception) -> dict:
    if isinstance(e, errors.BadSample):
        return {"skipped": e.reason, "id": rec_id, "source": e.source, "detail": e.detail}
    return {"skipped": errors.UNEXPECTED_ERROR, "id": rec_id, "source": "", "detail": f"{type(e).__name__}: {e}"}


class _Prepare(grain.transforms.RandomMap):
    """A record -> one prepared row, or a skip marker; never raises."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def random_map(self, element, rng: np.random.Generator):
        record, task = element
        rec_id = "?"
        try:
            rec_id = _text(record.get("id", "?")) if isinstance(record, Mapping) else "?"
            return self.prepare(*record_fields(record), task, rng)
        except Exception as e:  # one bad sample must not end a run; it is counted (or raised when strict)
            return _skipped(rec_id, e)

    def pixels(self, src, name: str, crop: bool, rng: np.random.Generator) -> np.ndarray:
        im = images.open_rgb(src, self.cfg.max_pixels, name, self.cfg.max_image_bytes)
        box = images.random_resized_crop_box(*im.size, rng, self.cfg.crop_scale) if crop else None
        return images.to_pixels(im, self.cfg.image_size, box)

    def annotation(self, ann: dict, task: str, rng: np.random.Generator) -> tuple[dict, str]:
        """Synthetic scenes become an annotation of the task, in a language drawn from cfg.languages."""
        if "scene" in ann:
            task = "caption" if task == AUTO else task
            lang = self.cfg.languages[int(rng.integers(len(self.cfg.languages)))]
            return synthetic.annotate(ann["scene"], task, lang, rng), task
        return ann, infer_task(ann) if task == AUTO else task


def _image_name(rec_id: str, src, i: int) -> str:
    return src if isinstance(src, str) else f"{rec_id}/image{i}"


class PrepareInstruction(_Prepare):
    def __init__(self, cfg: DataConfig, tokenizer, qformer_tokenizer):
        super().__init__(cfg)
        self.tokenizer, self.qformer_tokenizer = tokenizer, qformer_tokenizer

    def prepare(self, rec_id: str, imgs: list, ann: dict, task: str, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        crop = cfg.augment and "scene" not in ann
        ann, task = self.annotation(ann, task, rng)
        row, used = formats.model_input(
            formats.conversation(task, ann),
            len(imgs),
            self.tokenizer,
            self.qformer_tokenizer,
            max_len=cfg.text_len,
            image_token_id=cfg.image_token_id,
            num_query_tokens=cfg.num_query_tokens,
            instruction_len=cfg.qformer_text_len if self.qformer_tokenizer else 0,
        )
        if used > cfg.max_images:
            raise errors.BadSample(errors.TOO_MANY_IMAGES, f"{used} images > {cfg.max_images} slots")
        pixels = np.zeros((cfg.max_images, cfg.image_size, cfg.image_size, 3), np.float32)
        for i in range(used):
            pixels[i] = self.pixels(imgs[i], _image_name(rec_id, imgs[i], i), crop and task not in BOX_TASKS, rng)
        row["pixel_values"] = pixels
        row["image_mask"] = (np.arange(cfg.max_images) < used).astype(np.int32)
        return row


class PreparePair(_Prepare):
    def __init__(self, cfg: DataConfig, qformer_tokenizer):
        super().__init__(cfg)
        self.qformer_tokenizer = qformer_tokenizer

    def prepare(self, rec_id: str, imgs: list, ann: dict, task: str, rng: np.random.Generator) -> dict:
        crop = self.cfg.augment and "scene" not in ann
        ann, task = self.annotation(ann, "caption" if task == AUTO else task, rng)
        caption = formats.conversation(task, ann).turns[0].answer
        if not caption.strip():
            raise errors.BadSample(errors.EMPTY_TEXT, "empty caption")
        if len(imgs) != 1:
            raise errors.BadSample(errors.IMAGE_COUNT_MISMATCH, f"a pair needs one image, got {len(imgs)}")
        q = formats.encode_qformer_text(caption, self.qformer_tokenizer, self.cfg.qformer_text_len, "right")
        itg = q["ids"].copy()
        itg[0] = self.qformer_tokenizer.dec_id
        pixels = self.pixels(imgs[0], _image_name(rec_id, imgs[0], 0), crop, rng)
        return {"pixel_values": pixels, "text_ids": q["ids"], "text_mask": q["mask"], "itg_ids": itg}
