"""Grain pipelines: sources -> per-process shard -> seeded shuffle -> repeat -> weighted mixture ->
sample preparation (task format, tokens, images) -> skip + static-shape batches [-> worker processes]
-> skip counts.

Everything up to sample preparation is a `grain.MapDataset`, so the order is a pure function of
(seed, process_index, process_count) and the iterator state is a few integers. Preparation never raises:
a bad sample becomes a `{"skipped": reason, ...}` marker that the batching stage drops, and the last stage
(in the main process) counts in `iterator.skipped`, or raises as `BadSampleError` when `strict`. The
counts are part of `get_state()`, so they survive a restore. With `num_workers` > 0 each worker process
prepares and batches its own slice and the batches are interleaved (deterministic for a given worker
count, but a different order from `num_workers=0`); the main program must then be import-safe
(`if __name__ == "__main__":`), since Grain spawns its workers.

Instruction batches (stages 2-3), all rows of fixed shape:
  input_ids [B, T] int32        Ziya prompt text, images as num_query_tokens x image_token_id, padded with pad_id
  attention_mask [B, T] int32   1 on real tokens
  loss_mask [B, T] int32        1 on answer tokens and their EOS: position t is a target predicted at t-1
  pixel_values [B, N, S, S, 3] float32  CLIP-normalised; unused slots are 0
  image_mask [B, N] int32       1 on used image slots (the i-th used slot fills the i-th placeholder run)
  qformer_ids, qformer_mask [B, Tq] int32  (when qformer_text_len > 0) the instruction, left-truncated
Packed instruction batches (`pack=True`): each row holds as many whole examples, in order, as fit in its T tokens
and N image slots (first fit over the batch's rows; a batch ends at the first example that fits in none of them,
which then starts the next batch). Besides the keys above:
  segment_ids [B, T] int32      k on the k-th example's tokens (from 1), 0 on padding
  positions [B, T] int32        each token's position within its own example
  qformer_ids, qformer_mask [B, N, Tq] int32  the instruction of the example that owns each image slot
Pair batches (stage 1):
  pixel_values [B, S, S, 3] float32; text_ids, text_mask [B, Tq] int32 ([CLS] caption [SEP]);
  itg_ids [B, Tq] int32 (text_ids with [CLS] replaced by [DEC], the ITG decoder input)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from ziya_jax.data import errors, formats, images, synthetic

AUTO = "auto"  # the task comes from the record: its "task" field, or the fields it has
BOX_TASKS = ("grounding", "grounded_caption")
SMALL_SOURCE = 4096  # shards shorter than this are shuffled by SmallShuffle


@dataclasses.dataclass(frozen=True)
class Source:
    """One mixture component: random-access records, the task made of them, and its mixture weight.
    The same records may appear in several components with different tasks. "auto" takes a manifest
    record's own task (see `infer_task`) and makes captions of synthetic scenes."""

    records: Any
    task: str = AUTO
    weight: float = 1.0
    name: str = ""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    batch_size: int
    text_len: int = 128  # LLM tokens per row
    max_images: int = 1  # image slots per row
    image_size: int = 224
    num_query_tokens: int = 32
    image_token_id: int = 39423
    qformer_text_len: int = 0  # Q-Former tokens: the Chat instruction (0 = Base, none) or the stage-1 caption
    languages: tuple[str, ...] = formats.LANGS  # the synthetic set's languages, drawn per sample
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever (training)
    # Random resized crop (BLIP-2's train transform, scale 0.5-1). Off by default; never applied to box tasks
    # or synthetic scenes, whose answers (boxes, positions, counts) would no longer match the crop. There is no
    # horizontal flip at all: it swaps left and right, which position questions and answers (and any text in
    # an image) depend on.
    augment: bool = False
    crop_scale: tuple[float, float] = (0.5, 1.0)
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    max_image_bytes: int = images.DEFAULT_MAX_BYTES  # image files above this are refused before they are read
    pack: bool = False  # several examples per instruction row (text_len tokens, max_images slots)
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it
    num_workers: int = 0  # worker processes for sample preparation (grain mp_prefetch)
    worker_buffer_size: int = 16
    read_threads: int = 0  # threads per process for sample preparation
    max_consecutive_skips: int = 1000  # so that a source of nothing but bad samples fails instead of spinning

    def __post_init__(self):
        for key in ("batch_size", "text_len", "max_images", "image_size", "num_query_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"DataConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.qformer_text_len and self.qformer_text_len < 3:
            raise ValueError(f"DataConfig.qformer_text_len must be 0 or >= 3, got {self.qformer_text_len}")
        unknown = set(self.languages) - set(formats.LANGS)
        if not self.languages or unknown:
            raise ValueError(f"DataConfig.languages={self.languages}; choose from {formats.LANGS}")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    return process_index, process_count


def mixture(
    sources: Sequence[Source], cfg: DataConfig, process_index: int | None = None, process_count: int | None = None
) -> grain.MapDataset:
    """(record, task) pairs: each source sharded by process (disjoint slices), shuffled by its own seed
    (reshuffled each epoch), repeated, then interleaved in proportion to the weights."""
    if not sources:
        raise ValueError("no data sources given")
    process_index, process_count = _process(process_index, process_count)
    parts = []
    for k, src in enumerate(sources):
        name = src.name or f"source {k} ({type(src.records).__name__}, {len(src.records)} records)"
        if src.task != AUTO and src.task not in formats.TASKS:
            raise ValueError(f"{name}: unknown task {src.task!r}; known: {[AUTO, *formats.TASKS]}")
        if not src.weight > 0:
            raise ValueError(f"{name}: weight must be > 0, got {src.weight}")
        ds = grain.MapDataset.source(src.records)[process_index::process_count]
        if len(ds) == 0:
            raise ValueError(
                f"{name}: no records for process {process_index} of {process_count} ({len(src.records)} records in all)"
            )
        if cfg.shuffle:
            seed = int(np.random.SeedSequence([cfg.seed, k]).generate_state(1)[0])
            ds = ds.shuffle(seed=seed) if len(ds) >= SMALL_SOURCE else SmallShuffle(ds, seed)
        parts.append(ds.repeat(cfg.num_epochs).map(_TagTask(src.task)))
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, [s.weight for s in sources])


class SmallShuffle(grain.MapDataset):
    """A seeded shuffle that differs each epoch, for small sources. Grain's random-access index shuffle
    walks cycles over a large fixed domain, so it costs ~40/n ms per element (8 ms at n=2); a stored
    permutation of a small source costs nothing per element."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed, self._n = seed, len(parent)
        self._perm = (-1, None)  # (epoch, permutation), replaced as a whole so threads never see a mix

    def __len__(self) -> int:
        return self._n

    def __str__(self) -> str:
        return f"SmallShuffle(seed={self._seed})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, self._n)
        cached_epoch, perm = self._perm
        if cached_epoch != epoch:
            perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            self._perm = (epoch, perm)
        return self._parent[int(perm[i]) + epoch * self._n]


def instruction_batches(
    sources: Sequence[Source],
    cfg: DataConfig,
    tokenizer,
    qformer_tokenizer=None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Batches for stages 2-3 (keys in the module docstring). `iter()` it; the iterator has `skipped`."""
    if cfg.qformer_text_len and qformer_tokenizer is None:
        raise ValueError("DataConfig.qformer_text_len > 0 (Chat) needs a qformer_tokenizer")
    prepare = _PrepareInstruction(cfg, tokenizer, qformer_tokenizer if cfg.qformer_text_len else None)
    return _finish(
        mixture(sources, cfg, process_index, process_count),
        prepare,
        cfg,
        functools.partial(Packer, cfg.batch_size, cfg.text_len, cfg.max_images, tokenizer.pad_id) if cfg.pack else None,
    )


def pair_batches(
    sources: Sequence[Source],
    cfg: DataConfig,
    qformer_tokenizer,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Image-caption batches for stage 1 (ITC/ITM/ITG); captions in the Q-Former tokenizer, qformer_text_len
    tokens (BLIP-2: 32), cut on the right. Sources must have task "caption" or "auto" (caption records)."""
    bad = [s.task for s in sources if s.task not in ("caption", AUTO)]
    if bad:
        raise ValueError(f"pair sources must have task 'caption' or 'auto', got {bad}")
    if not cfg.qformer_text_len:
        raise ValueError("pair batches need DataConfig.qformer_text_len (BLIP-2 uses 32)")
    if cfg.pack:
        raise ValueError("DataConfig.pack is for instruction rows; image-caption pairs are not packed")
    return _finish(mixture(sources, cfg, process_index, process_count), _PreparePair(cfg, qformer_tokenizer), cfg)


def _finish(ds: grain.MapDataset, prepare, cfg: DataConfig, new_batch=None) -> grain.IterDataset:
    ds = ds.random_map(prepare, seed=cfg.seed)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=2 * cfg.batch_size))
    it = SkipAndBatch(it, new_batch or functools.partial(Stack, cfg.batch_size), cfg.strict, cfg.max_consecutive_skips)
    if cfg.num_workers:
        from absl import flags

        # Grain's worker processes read absl flags; outside an absl app nobody parses them (defaults are meant).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size)
        )
    return CountSkips(it)


class _TagTask(grain.transforms.Map):
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


class _PrepareInstruction(_Prepare):
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


class _PreparePair(_Prepare):
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


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class Stack:
    """One batch being filled: `batch_size` rows as they come."""

    def __init__(self, batch_size: int):
        self.batch_size, self.rows = batch_size, []

    @property
    def full(self) -> bool:
        return len(self.rows) == self.batch_size

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: dict) -> bool:
        self.rows.append(row)
        return True

    def batch(self) -> dict[str, np.ndarray]:
        return _stack(self.rows)


class Packer:
    """One packed batch being filled: each prepared instruction row goes, whole and in order, into the first of
    `batch_size` rows with room for its tokens and images (the format is in the module docstring)."""

    def __init__(self, batch_size: int, text_len: int, max_images: int, pad_id: int):
        self.text_len, self.max_images, self.pad_id = text_len, max_images, pad_id
        self.rows = [[] for _ in range(batch_size)]
        self.room = [(text_len, max_images)] * batch_size

    @property
    def full(self) -> bool:
        return all(tokens == 0 for tokens, _ in self.room)

    def __len__(self) -> int:
        return sum(len(examples) for examples in self.rows)

    def add(self, example: dict) -> bool:
        """Places the example; False (and nothing placed) when it fits in no row."""
        need = int(example["attention_mask"].sum()), int(example["image_mask"].sum())
        for i, (tokens, slots) in enumerate(self.room):
            if need[0] <= tokens and need[1] <= slots:
                self.rows[i].append(example)
                self.room[i] = (tokens - need[0], slots - need[1])
                return True
        return False

    def batch(self) -> dict[str, np.ndarray]:
        return _stack([self._row(examples) for examples in self.rows])

    def _row(self, examples: list[dict]) -> dict[str, np.ndarray]:
        text = {k: [] for k in ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions")}
        images = {k: [] for k in ("pixel_values", "image_mask", "qformer_ids", "qformer_mask") if k in examples[0]}
        for segment, ex in enumerate(examples, 1):
            length, used = int(ex["attention_mask"].sum()), int(ex["image_mask"].sum())
            for k in ("input_ids", "attention_mask", "loss_mask"):
                text[k].append(ex[k][:length])
            text["segment_ids"].append(np.full(length, segment, np.int32))
            text["positions"].append(np.arange(length, dtype=np.int32))
            images["pixel_values"].append(ex["pixel_values"][:used])
            images["image_mask"].append(ex["image_mask"][:used])
            for k in ("qformer_ids", "qformer_mask"):
                if k in images:
                    images[k].append(np.repeat(ex[k][None], used, axis=0))
        row = {}
        for k, parts in text.items():
            row[k] = np.full(self.text_len, self.pad_id if k == "input_ids" else 0, np.int32)
            flat = np.concatenate(parts)
            row[k][: len(flat)] = flat
        for k, parts in images.items():
            flat = np.concatenate(parts)
            row[k] = np.zeros((self.max_images, *flat.shape[1:]), flat.dtype)
            row[k][: len(flat)] = flat
        return row


class SkipAndBatch(grain.IterDataset):
    """Fills one batch at a time (`new_batch()`: a Stack, or a Packer for packed rows) with good rows, passing
    on how many samples of each reason it dropped on the way:
    -> {"batch": {...} | None, "skipped": {reason: n}, "error": None | (kind, message)}; the batch is None
    after an error, or at the end of a finite input when the last rows were dropped. It runs where the
    rows are prepared (in each worker process, when there are workers), so only whole batches cross
    process boundaries; `CountSkips` then totals the counts in the main process. A last partial batch is
    dropped, because every batch must have the same static shape, and its rows are counted as partial_batch
    (with workers, each worker's). A row that no longer fits a packed batch starts the next one; until then
    the iterator's state is the input's state from before that row, so a restore reads it again."""

    def __init__(self, parent: grain.IterDataset, new_batch, strict: bool = False, max_consecutive_skips: int = 1000):
        super().__init__(parent)
        self.new_batch, self.strict, self.max_consecutive_skips = new_batch, strict, max_consecutive_skips

    def __iter__(self) -> "_SkipAndBatchIterator":
        return _SkipAndBatchIterator(self._parent.__iter__(), self)


class _SkipAndBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: SkipAndBatch):
        super().__init__(parent)
        self.spec = spec
        self.held, self.held_state = None, None  # the row that did not fit the last batch, and the state before it

    def __next__(self) -> dict[str, Any]:
        batch, skipped, run = self.spec.new_batch(), collections.Counter(), 0
        if self.held is not None:
            batch.add(self.held)
            self.held = self.held_state = None
        while not batch.full:
            state = self._parent.get_state() if isinstance(batch, Packer) else None
            try:
                row = next(self._parent)
            except StopIteration:  # the end of a finite epoch: report the skips and the rows too few for a batch
                if len(batch):
                    skipped[errors.PARTIAL_BATCH] += len(batch)
                if skipped:
                    return {"batch": None, "skipped": dict(skipped), "error": None}
                raise
            if "skipped" not in row:
                run = 0
                if not batch.add(row):
                    self.held, self.held_state = row, state
                    break
                continue
            skipped[row["skipped"]] += 1
            run += 1
            where = row["id"] + (f" ({row['source']})" if row["source"] and row["source"] != row["id"] else "")
            message = f"sample {where}: {row['skipped']}: {row['detail']}"
            if self.spec.strict:
                return {"batch": None, "skipped": dict(skipped), "error": ("strict", message)}
            if run >= self.spec.max_consecutive_skips:
                return {
                    "batch": None,
                    "skipped": dict(skipped),
                    "error": ("stuck", f"{run} bad samples in a row (last: {message})"),
                }
        return {"batch": batch.batch(), "skipped": dict(skipped), "error": None}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state() if self.held is None else self.held_state

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
        self.held = self.held_state = None


class CountSkips(grain.IterDataset):
    """Unwraps SkipAndBatch's output into plain batches and keeps the running skip counts in
    `iterator.skipped` and in the iterator state; raises BadSampleError (strict) or RuntimeError (a run of
    max_consecutive_skips bad samples) in the main process."""

    def __iter__(self) -> "CountSkipsIterator":
        return CountSkipsIterator(self._parent.__iter__())


class CountSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.skipped: collections.Counter[str] = collections.Counter()

    def __next__(self) -> dict[str, np.ndarray]:
        out = {"batch": None, "error": None}
        while out["batch"] is None and out["error"] is None:  # batch None, no error: counts at the very end
            out = next(self._parent)
            self.skipped.update(out["skipped"])
        if out["error"] is not None:
            kind, message = out["error"]
            if kind == "strict":
                raise errors.BadSampleError(message)
            raise RuntimeError(f"{message}; skipped so far: {dict(self.skipped)}")
        return out["batch"]

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped": dict(self.skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.skipped = collections.Counter(state["skipped"])
