"""Where a compiled step's time goes: a jax.profiler trace of a few steps, summed per op.

Reads the Perfetto JSON that `jax.profiler.trace(create_perfetto_trace=True)` writes. An accelerator's timelines
are the processes named /device:... (one thread per GPU stream or TPU core line); XLA on a CPU traces its ops as
events with an `hlo_op` argument on the host threads that ran them. A timeline's busy time per step against the
step's wall time tells kernel-bound from launch-bound. hlo_ops reads the compiled program's text, so that an event's
op name tells what the op is (a product, a cache write) and whether it runs in the decoding loop.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
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
    """Per step: each timeline's busy seconds (the union of its op events, which may nest: a CPU while loop holds
    its body's ops) and op count, the `top` (timeline, name) pairs by summed duration, and the `top` op kinds (an
    op's name without its numeric suffix: dot.12 and dot.40 are both dot) summed over all timelines."""
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    spans, per_op, op_count = collections.defaultdict(list), collections.Counter(), collections.Counter()
    for e in events:
        on_device = processes.get(e.get("pid"), "").startswith("/device:")
        if e.get("ph") != "X" or not (on_device or "hlo_op" in e.get("args", {})):
            continue
        timeline = f"{processes.get(e['pid'], e['pid'])} {threads.get((e['pid'], e['tid']), e['tid'])}"
        spans[timeline].append((e["ts"], e["ts"] + e.get("dur", 0.0)))  # Chrome trace times are microseconds
        per_op[timeline, e["name"]] += e.get("dur", 0.0) * 1e-6
        op_count[timeline, e["name"]] += 1
    per_kind, kind_count = collections.Counter(), collections.Counter()
    for (timeline, name), s in per_op.items():
        kind = re.sub(r"([._]\d+)+$", "", name)
        per_kind[kind] += s
        kind_count[kind] += op_count[timeline, name]
    return {
        "timelines": {
            t: {"busy_s": _covered(spans[t]) * 1e-6 / steps, "events": len(spans[t]) / steps} for t in sorted(spans)
        },
        "top": [
            {"timeline": t, "name": n, "s": s / steps, "calls": op_count[t, n] / steps}
            for (t, n), s in per_op.most_common(top)
        ],
        "kinds": [{"kind": k, "s": s / steps, "calls": kind_count[k] / steps} for k, s in per_kind.most_common(top)],
    }


def _covered(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def print_device_time(summary: dict, step_s: float) -> None:
    if not summary["timelines"]:
        print("profile: the trace has no XLA op events")
        return
    print(f"profile, per step of {step_s * 1e3:.2f} ms:")
    for timeline, t in summary["timelines"].items():
        print(f"  {timeline}: busy {t['busy_s'] * 1e3:.2f} ms in {t['events']:.0f} events")
    for op in summary["top"]:
        print(f"  {op['s'] * 1e3:8.3f} ms {op['calls']:6.1f} calls  {op['name'][:90]}  [{op['timeline']}]")
    print("  by op kind, all timelines (a loop's time holds its body's):")
    for op in summary["kinds"]:
        print(f"  {op['s'] * 1e3:8.3f} ms {op['calls']:6.1f} calls  {op['kind'][:90]}")


def hlo_ops(hlo_text: str) -> dict[str, dict]:
    """The instructions of a compiled module's text (`jitted.lower(...).compile().as_text()`), by name, the names a
    trace's op events carry: {name: {"opcodes": its opcode and those of every computation it calls, "op_name": the
    JAX path in its metadata (XLA drops it from some), "rank": its result's rank, "in_loop": whether it runs inside
    a while loop's body}}. Parsed from the text by hand: jax exposes no structured HLO of a compiled CPU program."""
    computations, instructions, current = {}, {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and " = " not in line:
            current = computations.setdefault(header.group(1), [])
            continue
        inst = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not inst or current is None:
            continue
        rest = inst.group(2)
        opcode = re.search(r"(?:^|\s)([a-z][a-z0-9\-]*)\(", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        shape = re.match(r"[a-z0-9]+\[([\d,]*)\]", rest)
        instructions[inst.group(1)] = {
            "opcode": opcode.group(1) if opcode else "",
            "rank": len(shape.group(1).split(",")) if shape and shape.group(1) else 0,
            "op_name": op_name.group(1) if op_name else "",
            "calls": re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", rest),
            "body": re.findall(r"body=%?([\w.\-]+)", rest),
        }
        current.append(inst.group(1))

    def opcodes(name: str, seen=()) -> set[str]:
        found = {instructions[name]["opcode"]}
        for called in instructions[name]["calls"]:
            for member in computations.get(called, ()):
                if member not in seen:
                    found |= opcodes(member, (*seen, member))
        return found

    in_loop = set()
    bodies = [b for inst in instructions.values() for b in inst["body"]]
    while bodies:
        for member in computations.get(bodies.pop(), ()):
            if member not in in_loop:
                in_loop.add(member)
                bodies += instructions[member]["body"]
    return {
        name: {"opcodes": opcodes(name), "op_name": inst["op_name"], "rank": inst["rank"], "in_loop": name in in_loop}
        for name, inst in instructions.items()
    }
