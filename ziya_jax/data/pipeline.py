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

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from ziya_jax.data import batching, formats, images, samples
from ziya_jax.data.samples import AUTO

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
        parts.append(ds.repeat(cfg.num_epochs).map(samples.TagTask(src.task)))
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
    prepare = samples.PrepareInstruction(cfg, tokenizer, qformer_tokenizer if cfg.qformer_text_len else None)
    return _finish(
        mixture(sources, cfg, process_index, process_count),
        prepare,
        cfg,
        functools.partial(batching.Packer, cfg.batch_size, cfg.text_len, cfg.max_images, tokenizer.pad_id)
        if cfg.pack
        else None,
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
    return _finish(
        mixture(sources, cfg, process_index, process_count), samples.PreparePair(cfg, qformer_tokenizer), cfg
    )


def _finish(ds: grain.MapDataset, prepare, cfg: DataConfig, new_batch=None) -> grain.IterDataset:
    ds = ds.random_map(prepare, seed=cfg.seed)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=2 * cfg.batch_size))
    it = batching.SkipAndBatch(
        it, new_batch or functools.partial(batching.Stack, cfg.batch_size), cfg.strict, cfg.max_consecutive_skips
    )
    if cfg.num_workers:
        from absl import flags

        # Grain's worker processes read absl flags; outside an absl app nobody parses them (defaults are meant).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size)
        )
    return batching.CountSkips(it)
