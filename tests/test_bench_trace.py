"""The bench's profile summary: a real jax.profiler trace is read back, and device timelines are summed per step."""
import jax
import jax.numpy as jnp
import pytest

from ziya_jax.bench.trace import device_time, trace_events


def test_a_real_trace_is_read_and_has_no_device_timelines_on_cpu(tmp_path):
    step = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    step(x).block_until_ready()
    events = trace_events(lambda: [step(x) for _ in range(2)][-1].block_until_ready(), str(tmp_path))
    assert any(e.get("ph") == "X" for e in events)  # the host's events are there
    assert device_time(events, 2) == {"timelines": {}, "top": []}


def _meta(kind, pid, name, tid=0):
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def test_device_timelines_are_summed_per_step_and_ops_ranked():
    events = [_meta("process_name", 1, "/device:GPU:0"), _meta("thread_name", 1, "Stream #7(Compute)", 7),
              _meta("process_name", 2, "/host:CPU"),
              {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "ts": 0, "dur": 30.0},
              {"ph": "X", "pid": 1, "tid": 7, "name": "fusion", "ts": 40, "dur": 10.0},
              {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "ts": 60, "dur": 50.0},
              {"ph": "X", "pid": 2, "tid": 3, "name": "launch", "ts": 0, "dur": 500.0}]  # host: not counted
    summary = device_time(events, steps=2)
    timeline = "/device:GPU:0 Stream #7(Compute)"
    assert summary["timelines"] == {timeline: {"busy_s": pytest.approx(45e-6), "events": 1.5}}
    assert [(op["name"], op["calls"]) for op in summary["top"]] == [("gemm", 1.0), ("fusion", 0.5)]
    assert summary["top"][0]["s"] == pytest.approx(40e-6)
