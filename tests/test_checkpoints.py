"""Training checkpoints: state and data iterator saved together; an unreadable newest step falls back."""

import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ziya_jax.train.checkpoints import Checkpoints, abstract


def make_iterator():
    return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def test_resume_restores_state_and_next_batch(tmp_path):
    ckpt = Checkpoints(str(tmp_path), save_every=2, keep=2)
    it = make_iterator()
    state = {"w": jnp.zeros(3), "step": jnp.zeros((), jnp.int32)}
    for step in range(1, 6):
        next(it)
        state = {"w": state["w"] + 1, "step": jnp.asarray(step, jnp.int32)}
        ckpt.save(step, state, it)
    ckpt.wait()
    expected_next = next(it)
    assert sorted(ckpt.manager.all_steps()) == [2, 4]  # every 2 steps, the last 2 kept

    fresh = make_iterator()
    restored, step = Checkpoints(str(tmp_path), save_every=2, keep=2).restore_latest(abstract(state), fresh)
    assert step == 4 and int(restored["step"]) == 4
    np.testing.assert_array_equal(restored["w"], np.full(3, 4.0))
    np.testing.assert_array_equal(next(fresh), np.arange(16, 20))  # the batch after the 4th
    assert not np.array_equal(expected_next, np.arange(16, 20))  # (step 5 had moved on further)


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    ckpt = Checkpoints(str(tmp_path), save_every=1, keep=3, async_save=False)
    it = make_iterator()
    state = {"w": jnp.zeros(3)}
    for step in (1, 2):
        next(it)
        state = {"w": state["w"] + 1}
        ckpt.save(step, state, it)
    for root, _, files in os.walk(tmp_path / "2" / "state"):  # damage every array file of step 2
        for name in files:
            if not name.endswith(".json"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    with caplog.at_level(logging.WARNING):
        restored, step = Checkpoints(str(tmp_path), 1, 3).restore_latest(abstract(state), make_iterator())
    assert step == 1 and float(restored["w"][0]) == 1.0
    assert "step 2" in caplog.text and "unreadable" in caplog.text


def test_no_readable_checkpoint_refuses_to_restart(tmp_path):
    ckpt = Checkpoints(str(tmp_path), save_every=1, keep=3, async_save=False)
    it = make_iterator()
    ckpt.save(1, {"w": jnp.zeros(3)}, it)
    with pytest.raises(RuntimeError, match="refusing to restart"):
        Checkpoints(str(tmp_path), 1, 3).restore_latest({"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, make_iterator())
