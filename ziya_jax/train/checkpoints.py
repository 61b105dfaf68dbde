"""Training checkpoints (Orbax CheckpointManager): the train state and the data iterator's state in the same step,
async saves every N steps, keep the last K; restore falls back to an older step when the newest is unreadable."""

from __future__ import annotations

import logging
import os
import shutil

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental.multihost_utils import sync_global_devices

from ziya_jax.checkpoint import save_model
from ziya_jax.data.tokenizers import copy_tokenizers

log = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, directory: str, save_every: int, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def due(self, step: int) -> bool:
        """Whether `step` is a multiple of save_every. (Orbax's own interval would also save the first step of
        every run.)"""
        return step % self.save_every == 0

    def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
        """Saves when the step is due (or force); returns whether a save started."""
        if not (force or self.due(step)):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
        )
        return self.manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state, data_iterator):
        """(state, step) from the newest readable checkpoint, or None when there is none. An unreadable newest
        one is reported, moved aside to `unreadable-STEP` (kept for inspection, and out of the way of the step
        the resumed run will save again) and the previous one used; if checkpoints exist but none reads, this
        raises rather than silently starting again from step 0."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous step
                log.warning(
                    "checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one",
                    step,
                    self.manager.directory,
                    type(e).__name__,
                    e,
                )
                continue
            if step != steps[0]:
                self._move_aside(steps[: steps.index(step)])
            return restored["state"], step
        if steps:
            raise RuntimeError(
                f"checkpoints {steps} exist in {self.manager.directory} but none could be read; "
                "refusing to restart from step 0"
            )
        return None

    def _move_aside(self, steps):
        directory = str(self.manager.directory)
        if jax.process_index() == 0:
            for step in steps:
                aside = os.path.join(directory, f"unreadable-{step}")
                os.replace(os.path.join(directory, str(step)), aside)
                log.warning("moved the unreadable checkpoint of step %d to %s", step, aside)
        sync_global_devices("checkpoints moved aside")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def save_final(final: str, params, cfg, tokenizer_dir: str = "") -> None:
    """A stage's model, with the tokenizers of `tokenizer_dir` (if given) in `final/tokenizer`, where generate,
    chat, evaluate and serve look for them. It is written to `final.tmp` and renamed, so `final` (which marks
    the stage done) only ever appears whole; a `final.tmp` a killed run left behind is removed first. Every
    process writes its shards."""
    tmp = final + ".tmp"
    if jax.process_index() == 0 and os.path.exists(tmp):
        log.warning("removing %s, left by a run stopped while writing it", tmp)
        shutil.rmtree(tmp)
    sync_global_devices("leftover model removed")
    save_model(tmp, params, cfg)
    if jax.process_index() == 0:
        if tokenizer_dir:
            copy_tokenizers(tokenizer_dir, os.path.join(tmp, "tokenizer"))
        os.replace(tmp, final)
    sync_global_devices("final model in place")


def abstract(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, the target of a restore."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
