"""The bench's profile summary: a real jax.profiler trace is read back with the CPU's XLA ops, and timelines are
summed per step, nested events counted once."""

import jax
import jax.numpy as jnp
import pytest

from ziya_jax.bench.trace import device_time, hlo_ops, trace_events


def test_a_real_cpu_trace_has_the_step_ops(tmp_path):
    step = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w)
    x = jnp.ones((64, 64))
    step(x, x).block_until_ready()
    events = trace_events(lambda: [step(x, x) for _ in range(2)][-1].block_until_ready(), str(tmp_path))
    summary = device_time(events, 2)
    assert summary["timelines"], "no XLA op events in the CPU trace"
    assert all(t["events"] >= 1 and 0 < t["busy_s"] < 1 for t in summary["timelines"].values())
    assert sum(op["calls"] for op in summary["top"]) >= 2  # two products (the tanh fused into one of them)


def _meta(kind, pid, name, tid=0):
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def test_device_timelines_are_summed_per_step_and_ops_ranked():
    events = [
        _meta("process_name", 1, "/device:GPU:0"),
        _meta("thread_name", 1, "Stream #7(Compute)", 7),
        _meta("process_name", 2, "/host:CPU"),
        _meta("thread_name", 2, "pool", 4),
        {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "ts": 0, "dur": 30.0},
        {"ph": "X", "pid": 1, "tid": 7, "name": "fusion", "ts": 40, "dur": 10.0},
        {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "ts": 60, "dur": 50.0},
        {"ph": "X", "pid": 2, "tid": 3, "name": "launch", "ts": 0, "dur": 500.0},  # host: not counted
        # XLA CPU ops: a while loop holding a body op, which is not counted twice in the busy time
        {"ph": "X", "pid": 2, "tid": 4, "name": "while", "ts": 0, "dur": 100.0, "args": {"hlo_op": "while"}},
        {"ph": "X", "pid": 2, "tid": 4, "name": "dot", "ts": 20, "dur": 30.0, "args": {"hlo_op": "dot"}},
    ]
    summary = device_time(events, steps=2)
    gpu, cpu = "/device:GPU:0 Stream #7(Compute)", "/host:CPU pool"
    assert summary["timelines"] == {
        gpu: {"busy_s": pytest.approx(45e-6), "events": 1.5},
        cpu: {"busy_s": pytest.approx(50e-6), "events": 1.0},
    }
    assert [(op["name"], op["calls"]) for op in summary["top"]] == [
        ("while", 0.5),
        ("gemm", 1.0),
        ("dot", 0.5),
        ("fusion", 0.5),
    ]
    assert summary["top"][1]["s"] == pytest.approx(40e-6)
    assert [(op["kind"], op["calls"]) for op in summary["kinds"]] == [
        ("while", 0.5),
        ("gemm", 1.0),
        ("dot", 0.5),
        ("fusion", 0.5),
    ]


def test_compiled_ops_are_indexed_with_their_loop_and_rank(tmp_path):
    """A loop body's product is found by the name its trace event carries, inside the loop, with a matrix result;
    the product before the loop is outside it."""

    def program(x, w):
        x = x @ w

        def body(i, x):
            return jnp.tanh(x @ w)

        return jax.lax.fori_loop(0, 3, body, x)

    x, w = jnp.ones((8, 64)), jnp.ones((64, 64)) * 0.01
    step = jax.jit(program)
    step(x, w).block_until_ready()
    ops = hlo_ops(step.lower(x, w).compile().as_text())
    events = trace_events(lambda: step(x, w).block_until_ready(), str(tmp_path))
    traced = {e["args"]["hlo_op"] for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})}
    found = [ops[name] for name in traced & ops.keys()]
    products = [op for op in found if "dot" in op["opcodes"] and "while" not in op["opcodes"]]  # (a loop: its body's)
    assert {op["in_loop"] for op in products} == {False, True}  # XLA may peel an iteration out
    assert all(op["rank"] == 2 for op in products)
