"""Where a compiled step's time goes on an accelerator: a jax.profiler trace of a few steps, summed per op.

Reads the Perfetto JSON that `jax.profiler.trace(create_perfetto_trace=True)` writes. Its device timelines are the
processes named /device:... (one thread per GPU stream or TPU core line); a timeline's busy time per step against
the step's wall time tells kernel-bound from launch-bound. XLA on a CPU traces no per-op events, so there the
summary has no device timelines.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
from typing import Callable

import jax


def trace_events(run: Callable[[], None], trace_dir: str) -> list[dict]:
    """Call `run` (which must wait for the work it starts) under the profiler -> the trace's events."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run()
    paths = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    if not paths:
        raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        return json.load(f)["traceEvents"]


def device_time(events: list[dict], steps: int, top: int = 15) -> dict:
    """Per step: each device timeline's busy seconds and event count, and the `top` (timeline, name) pairs by
    time. Events on one timeline do not overlap (a stream runs one kernel at a time), so their durations add."""
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    busy, count, per_op = collections.Counter(), collections.Counter(), collections.Counter()
    op_count = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or not processes.get(e["pid"], "").startswith("/device:"):
            continue
        timeline = f"{processes[e['pid']]} {threads.get((e['pid'], e['tid']), e['tid'])}"
        seconds = e.get("dur", 0.0) * 1e-6  # Chrome trace times are microseconds
        busy[timeline] += seconds
        count[timeline] += 1
        per_op[timeline, e["name"]] += seconds
        op_count[timeline, e["name"]] += 1
    return {"timelines": {t: {"busy_s": busy[t] / steps, "events": count[t] / steps} for t in sorted(busy)},
            "top": [{"timeline": t, "name": n, "s": s / steps, "calls": op_count[t, n] / steps}
                    for (t, n), s in per_op.most_common(top)]}


def print_device_time(summary: dict, step_s: float) -> None:
    if not summary["timelines"]:
        print("profile: the trace has no device timelines (XLA on a CPU traces no per-op events)")
        return
    print(f"profile, per step of {step_s * 1e3:.2f} ms:")
    for timeline, t in summary["timelines"].items():
        print(f"  {timeline}: busy {t['busy_s'] * 1e3:.2f} ms in {t['events']:.0f} events")
    for op in summary["top"]:
        print(f"  {op['s'] * 1e3:8.3f} ms {op['calls']:6.1f} calls  {op['name'][:90]}  [{op['timeline']}]")
