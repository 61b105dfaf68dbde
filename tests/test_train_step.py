"""Stages as data: exactly the configured parameters train, frozen ones keep no optimizer state; the step on a
(data=2, fsdp=2, tensor=2) mesh equals the single-device step."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ziya_jax.checkpoint import load_model, save_model
from ziya_jax.config import ModelConfig, load_config
from ziya_jax.model import init_params
from ziya_jax.sharding import DEFAULT_RULES, batch_sharding, make_mesh, param_shardings
from ziya_jax.train.optimizer import default_optimizer, make_optimizer, schedule
from ziya_jax.train.step import Stage, init_state, train_step
from ziya_jax.tree import flatten, matches

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

OPT = default_optimizer(lr=1e-3, warmup_init_lr=1e-3, warmup_steps=0, total_steps=10)


def tiny(arg):
    return ModelConfig.from_dict(load_config(f"configs/tiny.py:{arg}").model.to_dict())


def instruction_batch(cfg, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 120, (batch, cfg.num_query_tokens + 8)).astype(np.int32)
    ids[:, : cfg.num_query_tokens] = cfg.image_token_id
    loss_mask = np.zeros_like(ids)
    loss_mask[:, -4:] = 1
    out = dict(
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        loss_mask=loss_mask,
        pixel_values=rng.normal(size=(batch, 1, 28, 28, 3)).astype(np.float32),
    )
    if cfg.variant == "chat":
        out.update(
            qformer_ids=rng.integers(1, 90, (batch, 5)).astype(np.int32), qformer_mask=np.ones((batch, 5), np.int32)
        )
    return {k: jnp.asarray(v) for k, v in out.items()}


def run_steps(cfg, stage, batch, n=2, params=None):
    params = init_params(cfg, jax.random.key(0)) if params is None else params
    tx = make_optimizer(OPT)
    state = init_state(params, stage, tx, jax.random.key(1))
    step = jax.jit(functools.partial(train_step, cfg=cfg, stage=stage, tx=tx, lr_schedule=schedule(OPT)))
    for _ in range(n):
        state, metrics = step(state, batch)
    return params, state, metrics


@pytest.mark.parametrize(
    "arg,trainable",
    [
        ("variant=base,stage=2", ("language_projection",)),
        ("variant=chat,stage=3", ("qformer", "query_tokens", "language_projection", r".*/lora_[ab]")),
    ],
)
def test_only_the_configured_parameters_train(arg, trainable):
    cfg = tiny(arg)
    stage = Stage(trainable=trainable, loss_weights=(("lm", 1.0),))
    params, state, metrics = run_steps(cfg, stage, instruction_batch(cfg))
    assert np.isfinite(float(metrics["loss"]))
    before, after = flatten(params), flatten(state.params())
    assert before.keys() == after.keys()
    for path in before:
        same = np.array_equal(np.asarray(before[path]), np.asarray(after[path]))
        if matches(path, trainable):
            # LoRA B starts at zero and A only moves once B has: both are in the trainable set regardless.
            assert path in flatten(state.trainable)
        else:
            assert same, f"frozen {path} changed"
            assert path not in flatten(state.trainable)
    # Optimizer state exists only for trainable leaves: Adam's mu has exactly their paths.
    mu = [
        s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")
    ][0].mu
    assert flatten(mu).keys() == flatten(state.trainable).keys()
    moved = [
        p
        for p in flatten(state.trainable)
        if "lora_a" not in p[-1] and not np.array_equal(np.asarray(before[p]), np.asarray(after[p]))
    ]
    assert moved, "nothing trained"


def test_frozen_parameters_kept_in_bfloat16_stay_put_and_give_the_same_loss(tmp_path):
    cfg = dataclasses.replace(tiny("variant=chat,stage=3"), dtype="bfloat16")
    trainable = ("qformer", "query_tokens", "language_projection", r".*/lora_[ab]")
    batch = instruction_batch(cfg)
    params, state, metrics = run_steps(cfg, Stage(trainable, (("lm", 1.0),), frozen_dtype="bfloat16"), batch)
    _, _, as_loaded = run_steps(cfg, Stage(trainable, (("lm", 1.0),)), batch, params=params)
    before = flatten(params)
    assert {a.dtype for a in jax.tree_util.tree_leaves(state.trainable)} == {np.dtype("float32")}
    for path, value in flatten(state.frozen).items():
        assert value.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(before[path].astype(jnp.bfloat16)))
    # The compute dtype rounds every frozen weight to bfloat16 anyway; only the norms' float32 scales differ.
    np.testing.assert_allclose(float(metrics["loss"]), float(as_loaded["loss"]), rtol=1e-2)
    # The stage's model keeps them in bf16; loading it gives the next stage float32 (its param_dtype) again.
    save_model(str(tmp_path / "model"), state.params(), cfg)
    loaded, _ = load_model(str(tmp_path / "model"))
    for path, value in flatten(loaded).items():
        assert value.dtype == jnp.float32, path
        if path in flatten(state.frozen):
            np.testing.assert_array_equal(np.asarray(value), np.asarray(before[path].astype(jnp.bfloat16)))
    with pytest.raises(ValueError, match="frozen_dtype"):
        Stage(trainable, (("lm", 1.0),), frozen_dtype="float16")


def test_empty_trainable_set_is_an_error():
    cfg = tiny("variant=base,stage=2")
    with pytest.raises(ValueError, match="matches no parameter"):
        init_state(
            init_params(cfg, jax.random.key(0)),
            Stage(("nothing_here",), (("lm", 1.0),)),
            make_optimizer(OPT),
            jax.random.key(1),
        )


def assert_sharded_step_matches_single_device(cfg, stage, batch, losses):
    params = init_params(cfg, jax.random.key(0))
    _, single, m1 = run_steps(cfg, stage, batch, n=1, params=params)
    mesh = make_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded_params = jax.device_put(params, param_shardings(cfg, mesh))
        sharded_batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        _, multi, m8 = run_steps(cfg, stage, sharded_batch, n=1, params=sharded_params)
    assert (
        multi.trainable["qformer"]["layer"]["layer_0"]["attention"]["attention"]["query"]["kernel"].sharding.spec[1]
        == "fsdp"
    )
    for k in ("loss", *losses):
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(multi.trainable), jax.tree_util.tree_leaves(single.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_sharded_step_matches_single_device_with_itc_over_the_global_batch():
    cfg = tiny("variant=base,stage=1")
    stage = Stage(
        trainable=("qformer", "query_tokens", "vision_proj", "text_proj", "itm_head", "temp"),
        loss_weights=(("itc", 1.0),),
    )  # the loss whose negatives cross data shards
    rng = np.random.default_rng(0)
    batch = {
        "pixel_values": jnp.asarray(rng.normal(size=(8, 28, 28, 3)), jnp.float32),
        "text_ids": jnp.asarray(rng.integers(3, 90, (8, 6)), jnp.int32),
        "text_mask": jnp.asarray(np.ones((8, 6), np.int32)),
    }
    assert_sharded_step_matches_single_device(cfg, stage, batch, ("itc",))


def test_sharded_step_on_packed_rows_matches_single_device():
    cfg = tiny("variant=chat,stage=2")
    stage = Stage(
        trainable=("language_model", "language_projection", "qformer", "query_tokens"), loss_weights=(("lm", 1.0),)
    )
    one = {k: np.asarray(v) for k, v in instruction_batch(cfg, batch=16).items()}
    pair = lambda x: x.reshape(8, 2, *x.shape[1:])  # rows 2i and 2i+1 share a packed row
    n = one["input_ids"].shape[1]
    batch = {k: pair(one[k]).reshape(8, 2 * n) for k in ("input_ids", "attention_mask", "loss_mask")}
    batch.update(
        segment_ids=np.repeat(np.array([[1, 2]], np.int32), n, axis=1).repeat(8, 0),
        positions=np.tile(np.arange(n, dtype=np.int32), (8, 2)),
        pixel_values=pair(one["pixel_values"])[:, :, 0],
        image_mask=np.ones((8, 2), np.int32),
        qformer_ids=pair(one["qformer_ids"]),
        qformer_mask=pair(one["qformer_mask"]),
    )
    assert_sharded_step_matches_single_device(cfg, stage, {k: jnp.asarray(v) for k, v in batch.items()}, ("lm",))


def test_weight_decay_skips_biases_norms_and_temperature():
    opt = default_optimizer(
        lr=1.0, warmup_init_lr=1.0, warmup_steps=0, total_steps=10, end_lr=1.0, weight_decay=0.5, grad_clip=1e9
    )
    tx = make_optimizer(opt)
    params = {
        "layer": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}},
        "temp": jnp.ones(()),
    }
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["layer"]["dense"]["kernel"]).max()) > 0  # decayed
    for leaf in (updates["layer"]["dense"]["bias"], updates["layer"]["norm"]["scale"], updates["temp"]):
        assert float(jnp.abs(leaf).max()) == 0


def test_lr_multipliers_scale_the_updates_of_the_parameters_they_match():
    opt = default_optimizer(
        lr=1e-2, warmup_init_lr=1e-2, warmup_steps=0, total_steps=10, end_lr=1e-2, lr_multipliers=(("qformer", 0.1),)
    )
    tx = make_optimizer(opt)
    leaf = jnp.arange(1.0, 5.0).reshape(2, 2)
    params = {"qformer": {"kernel": leaf}, "qformer_like": {"kernel": leaf}, "language_model": {"kernel": leaf}}
    grads = jax.tree_util.tree_map(lambda x: x - 2.5, params)
    state = tx.init(params)
    for _ in range(3):  # Adam's moments: the ratio holds at every step, not only the first
        updates, state = tx.update(grads, state, params)
        full = np.asarray(updates["language_model"]["kernel"])
        assert np.abs(full).min() > 0
        np.testing.assert_allclose(np.asarray(updates["qformer"]["kernel"]), 0.1 * full, rtol=1e-6)
        # the regex matches a path prefix, not any path that starts with the same letters
        np.testing.assert_array_equal(np.asarray(updates["qformer_like"]["kernel"]), full)


def test_itg_without_dec_token_is_an_error():
    with pytest.raises(ValueError, match="dec_token_id"):
        Stage(trainable=("qformer",), loss_weights=(("itg", 1.0),))
