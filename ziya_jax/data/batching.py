"""Batching: prepared rows -> static-shape batches (stacked, or packed several examples a row), with the skip
markers of bad samples dropped and counted; the counts travel in the iterator state."""

from __future__ import annotations

import collections
from typing import Any

import grain
import numpy as np

from ziya_jax.data import errors


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
