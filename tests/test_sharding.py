"""Parameters sharded over a (data=2, fsdp=2, tensor=2) mesh of 8 forced CPU devices, same forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ziya_jax.config import ModelConfig, load_config
from ziya_jax.model import ZiyaVisual, init_params
from ziya_jax.sharding import DEFAULT_RULES, batch_sharding, init_sharded, make_mesh

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
    assert dict(make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    for bad in [(3, 1, 1), (-1, -1, 2), (2, 2)]:
        try:
            make_mesh(bad)
        except ValueError:
            continue
        raise AssertionError(f"mesh {bad} accepted")


def test_sharded_forward_matches_single_device():
    assert jax.device_count() == 8
    cfg = ModelConfig.from_dict(load_config("configs/tiny.py:variant=chat,stage=3").model.to_dict())
    mesh = make_mesh((2, 2, 2))
    params = init_sharded(cfg, jax.random.key(0), mesh)
    plain = init_params(cfg, jax.random.key(0))  # same values as an unsharded init
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)

    q = params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 16, 16)
    emb = params["language_model"]["embed_tokens"]["embedding"]  # [vocab, embed]
    assert emb.sharding.spec == P("tensor", "fsdp")
    lora_a = params["language_model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert lora_a.sharding.spec == P(None, "fsdp", None)

    # Non-zero LoRA B so the adapters take part in the comparison.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(path) else x, params
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 120, (4, 12)).astype(np.int32)
    ids[:, :4] = cfg.image_token_id
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    pixels = rng.normal(size=(4, 1, 28, 28, 3)).astype(np.float32)
    qids = rng.integers(1, 90, (4, 5)).astype(np.int32)
    inputs = (ids, mask, pixels, qids, np.ones_like(qids))

    model = ZiyaVisual(cfg)
    single = jax.device_put(params, jax.devices()[0])
    expected = jax.jit(model.apply)({"params": single}, *map(jnp.asarray, inputs))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded_inputs = [jax.device_put(x, batch_sharding(mesh, x.ndim)) for x in inputs]
        got = jax.jit(model.apply)({"params": params}, *sharded_inputs)
    assert isinstance(got.sharding, NamedSharding)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)


def test_mesh_from_config_with_ici_and_dcn():
    import ml_collections

    config = ml_collections.ConfigDict({"mesh": {"ici": (2, -1, 2), "dcn": (-1, 1, 1)}})
    assert dict(make_mesh(config.mesh).shape) == {"data": 2, "fsdp": 2, "tensor": 2}  # one process: one granule
    with pytest.raises(ValueError, match="slices"):
        make_mesh({"ici": (1, -1, 1), "dcn": (2, 1, 1)})  # this process is the only one
    with pytest.raises(ValueError, match="expected keys"):
        make_mesh({"shape": (1, -1, 1)})


def test_hybrid_mesh_keeps_fsdp_inside_each_tpu_slice():
    from ziya_jax.compile import parse_topology, topology_devices

    devices = topology_devices(parse_topology("v5e-4", num_slices=2))
    mesh = make_mesh({"ici": (1, -1, 1), "dcn": (-1, 1, 1)}, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for i in range(2):  # the data axis crosses slices (DCN); each fsdp group is one slice (ICI)
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}


def test_rules_from_config_place_batches_and_the_kv_cache():
    import ml_collections

    from ziya_jax.sharding import cache_sharding, rules_from_config

    mesh = make_mesh((2, 2, 2))
    assert rules_from_config(ml_collections.ConfigDict()) == DEFAULT_RULES
    rules = rules_from_config(ml_collections.ConfigDict({"rules": [["act_batch", ["data"]], ["kv_heads", "tensor"]]}))
    assert batch_sharding(mesh, 3, rules).spec == P("data", None, None)
    assert batch_sharding(mesh, 2).spec == P(("data", "fsdp"), None)
    assert cache_sharding(mesh).spec == P(None, ("data", "fsdp"), "tensor", None, None)
    with pytest.raises(ValueError, match="no mesh axis"):
        rules_from_config(ml_collections.ConfigDict({"rules": [["embed", "model"]]}))


def test_optimizer_state_is_sharded_like_its_parameters():
    from ziya_jax.train.optimizer import default_optimizer, make_optimizer
    from ziya_jax.train.sharded import abstract_train_state
    from ziya_jax.train.step import Stage
    from ziya_jax.tree import flatten

    cfg = ModelConfig.from_dict(load_config("configs/tiny.py:variant=chat,stage=3").model.to_dict())
    stage = Stage(("qformer", "language_projection", r".*/lora_[ab]"), (("lm", 1.0),))
    mesh = make_mesh((2, 2, 2))
    state = abstract_train_state(cfg, stage, make_optimizer(default_optimizer(grad_accum_steps=2)), mesh)
    trainable = flatten(state.trainable)
    mirrored = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        if keys:
            assert leaf.sharding == trainable[keys].sharding and leaf.shape == trainable[keys].shape
            mirrored += 1
        else:
            assert leaf.sharding.spec == P()  # counters
    assert mirrored == 3 * len(trainable)  # Adam's mu and nu, and the accumulated gradients
    assert state.trainable["language_projection"]["kernel"].sharding.spec == P(None, "fsdp")
    q_proj = ("language_model", "layers", "self_attn", "q_proj", "kernel")  # frozen: no optimizer state
    assert q_proj in flatten(state.frozen) and q_proj not in trainable
