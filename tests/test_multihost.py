"""Two processes on localhost (4 forced CPU devices each, gloo collectives) train as one process with 8 devices:
same losses step for step, each process feeding only its own rows. An Orbax checkpoint written by both processes
restores, bit for bit, into a different mesh.

The worker half of this file runs as `python tests/test_multihost.py PROCESS_ID PORT WORKDIR` (never under
pytest); the one-process reference runs in the test itself (conftest forces 8 devices)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

STEPS, GLOBAL_BATCH = 3, 8


def train(workdir=None):
    """STEPS train steps on a (data=2, fsdp=2, tensor=2) mesh whose data axis spans the processes -> (losses,
    whether the checkpoint written to `workdir` (if given) restores exactly into a (1, 8, 1) mesh)."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec

    from ziya_jax.config import ModelConfig, load_config
    from ziya_jax.sharding import global_batch, make_mesh
    from ziya_jax.train.optimizer import default_optimizer, make_optimizer, schedule
    from ziya_jax.train.sharded import abstract_train_state, create_train_state, jit_train_step
    from ziya_jax.train.step import Stage

    assert jax.device_count() == 8
    # Stage-1 ITC: its negatives come from the whole global batch, so from the other process's rows too.
    cfg = ModelConfig.from_dict(load_config("configs/tiny.py:variant=base,stage=1").model.to_dict())
    stage = Stage(("qformer", "query_tokens", "vision_proj", "text_proj", "temp"), (("itc", 1.0),))
    opt = default_optimizer(lr=1e-3, warmup_init_lr=1e-3, warmup_steps=0, total_steps=10)
    tx = make_optimizer(opt)
    mesh = make_mesh({"ici": (-1, 2, 2), "dcn": (-1, 1, 1)})  # DCN = across processes
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    step = jit_train_step(cfg, stage, tx, schedule(opt), mesh)

    def batch(i):
        rng = np.random.default_rng(i)
        rows = {
            "pixel_values": rng.normal(size=(GLOBAL_BATCH, 28, 28, 3)).astype(np.float32),
            "text_ids": rng.integers(3, 90, (GLOBAL_BATCH, 6)).astype(np.int32),
            "text_mask": np.ones((GLOBAL_BATCH, 6), np.int32),
        }
        share = GLOBAL_BATCH // jax.process_count()  # this process's rows only
        mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
        return global_batch({k: v[mine] for k, v in rows.items()}, mesh)

    def values(state, on_mesh):  # every number of the state in one replicated vector (one compile, no rounding)
        flat = lambda t: jnp.concatenate([x.ravel().astype(jnp.float32) for x in jax.tree_util.tree_leaves(t)])
        vector = jax.jit(flat, out_shardings=NamedSharding(on_mesh, PartitionSpec()))
        return np.asarray(vector((state.step, state.trainable, state.frozen, state.opt_state)))

    with jax.set_mesh(mesh):
        state = create_train_state(cfg, stage, tx, jax.random.key(0), mesh)
        losses = []
        for i in range(STEPS):
            state, metrics = step(state, batch(i))
            losses.append(float(metrics["loss"]))
    if workdir is None:
        return losses, None
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(workdir, "ckpt"), state)
    ckpt.wait_until_finished()
    other = make_mesh((1, -1, 1))  # pure fsdp: every process reads different shards than it wrote
    target = abstract_train_state(cfg, stage, tx, other)
    restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "ckpt"), target)
    assert all(
        a.sharding == b.sharding for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(target))
    )
    return losses, bool(np.array_equal(values(state, mesh), values(restored, other)))


def worker(process_id: int, port: int, workdir: str) -> None:
    # Less LLVM optimisation: the same arithmetic (no fast-math either way), compiled about twice as fast.
    os.environ["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from ziya_jax.sharding import initialize_distributed

    assert initialize_distributed(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id, initialization_timeout=60
    )
    assert jax.process_count() == 2 and jax.local_device_count() == 4
    losses, restored_equal = train(workdir)
    if process_id == 0:
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump({"losses": losses, "restored_equal": restored_equal}, f)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_with_eight_devices(tmp_path):
    port, root = _free_port(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(i), str(port), str(tmp_path)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        one, _ = train()  # the reference, meanwhile: one process, 8 devices
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"worker failed ({p.returncode}):\n{out[-3000:]}"
    with open(tmp_path / "result.json") as f:
        two = json.load(f)
    assert len(set(two["losses"])) == STEPS  # training moves
    np.testing.assert_allclose(two["losses"], one, rtol=1e-5)
    # The checkpoint written by both processes reads back bit for bit into a (1, 8, 1) mesh.
    assert two["restored_equal"]


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
