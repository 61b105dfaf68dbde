"""Decode throughput of ziya_jax vs transformers' generate on the same converted weights, in one run.

Benchmark model (realistic shape, random weights): ViT-B/16-like tower at 224, a 6-layer 768-wide Q-Former with 32
queries, a 12-layer 768-wide LLaMA with vocab 32000. Rows: greedy batch 1, greedy batch 8, beam 4 (batch 1), each
forced to emit exactly --new-tokens tokens (min_new_tokens) so both sides do the same work, --repeats times with the
two sides interleaved (the median ratio and its spread are reported, so one noisy run decides nothing). Compilation
and warm-up are excluded; ziya_jax runs on decode_params (per-layer weights, made once per model). The roofline: every
decode step reads all LLM weights (one row of the embedding table), so tokens/s <= bandwidth / bytes; the rows'
tokens/s also pay the prefill (image encoding and prompt), the bound does not, so the batch-1 step (time for N
tokens - time for 1) / (N - 1) is what is held against it. Each row's ceiling is the ratio
ziya_jax would reach with its own prefill (timed alone: one new token) and every later step at that bound, since
all rows of a step share one read of the weights: what the image encoder, matmul-bound on both sides, leaves.

Then ziya_jax alone, float32 against int8 weights (ziya_jax.quantize), greedy batch 1 and 8, timed back to back:
tokens/s (prefill included) and the decoding step alone ((time for N tokens - time for 1) / (N - 1)).
--profile DIR traces one call of each row and prints where a decoding step's time goes (profile_rows), and the
float32 / int8 rows' op kinds.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ziya_jax.bench.trace import device_time, hlo_ops, print_device_time, trace_events
from ziya_jax.convert import load_hf
from ziya_jax.decode import DecodeConfig, compiled_search, decode_params, generate
from ziya_jax.quantize import quantize
from ziya_jax.summary import count_params


def hf_model(small: bool):
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig

    torch.manual_seed(0)
    w, layers, vocab, image = (64, 2, 512, 32) if small else (768, 12, 32000, 224)
    vision = dict(
        hidden_size=w,
        intermediate_size=4 * w,
        num_hidden_layers=layers,
        num_attention_heads=w // 64,
        image_size=image,
        patch_size=16,
        qkv_bias=True,
        layer_norm_eps=1e-6,
    )
    qformer = dict(
        hidden_size=w,
        num_hidden_layers=max(layers // 2, 1),
        num_attention_heads=w // 64,
        intermediate_size=4 * w,
        cross_attention_frequency=1,
        encoder_hidden_size=w,
    )
    text = LlamaConfig(
        hidden_size=w,
        intermediate_size=int(w * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=w // 64,
        vocab_size=vocab,
        eos_token_id=2,
        bos_token_id=1,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=vocab - 1,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF's init leaves the vision tower near zero; give every weight some scale
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def measure_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Bytes/s of a matrix-vector product over a 1 GiB matrix: the access pattern (every weight read once per
    token) and so the memory bound that batch-1 decoding works against."""
    w = jnp.ones((8192, n_bytes // 4 // 8192), jnp.float32)
    x = jnp.ones((1, 8192), jnp.float32)
    gemv = jax.jit(lambda a, b: a @ b)
    return n_bytes / best_of(lambda: gemv(x, w).block_until_ready(), 5)


def step_bytes(cfg) -> int:
    """Bytes of weights a decoding step reads however many rows it advances: every LLM weight, of the embedding
    table one row a token."""
    read = count_params(cfg)["language_model"]
    read -= 0 if cfg.llm.tie_word_embeddings else (cfg.llm.vocab_size - 1) * cfg.llm.width
    return read * np.dtype(cfg.param_dtype).itemsize


def best_of(fn, repeats: int) -> float:
    """Best of `repeats` timed calls, after one untimed call (compilation, warm-up)."""
    fn()
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


ROWS = (("greedy b1", 1, 1), ("greedy b8", 8, 1), ("beam4 b1", 1, 4))  # (name, batch, beams)
CATEGORIES = (
    "weight products",
    "attention over the cache",
    "cache and state writes",
    "copies",
    "norms, RoPE, softmax, SiLU",
    "sampling, beam bookkeeping",
    "idle cores",
)


def run(args) -> dict:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use (taskset), as XLA
    model = hf_model(args.small)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        params, cfg = load_hf(tmp)
    params = decode_params(jax.device_put(params))  # on the device, once per model, as transformers holds them
    q, image_token, size = cfg.num_query_tokens, cfg.image_token_id, cfg.vision.image_size
    rng = np.random.default_rng(0)
    n = args.new_tokens
    rows, calls = [], {}
    for name, batch, beams in ROWS:
        ids = np.concatenate([np.full((batch, q), image_token), rng.integers(3, image_token, (batch, 16))], 1)
        mask = np.ones_like(ids)
        pixels = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
        t_ids, t_mask, t_pix = map(torch.from_numpy, (ids, mask, pixels))

        def ours(new_tokens, ids=ids, mask=mask, pixels=pixels, beams=beams):
            dc = DecodeConfig(
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams, eos_token_id=2, pad_token_id=0
            )
            return generate(params, cfg, ids, mask, jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None], dc=dc)

        def theirs(new_tokens, ids=t_ids, mask=t_mask, pixels=t_pix, beams=beams):
            with torch.no_grad():
                return model.generate(
                    pixel_values=pixels,
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    num_beams=beams,
                    do_sample=False,
                    eos_token_id=2,
                    pad_token_id=0,
                )

        calls[name] = (ids, mask, jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None])
        ours(n), ours(1), theirs(n)  # compilation and warm-up
        runs = [
            (_timed(lambda: ours(n)), _timed(lambda: theirs(n)), _timed(lambda: ours(1))) for _ in range(args.repeats)
        ]
        ours_s, theirs_s, prefill_s = (np.array(column) for column in zip(*runs))
        ratios = theirs_s / ours_s
        rows.append(
            dict(
                row=name,
                ziya_jax_tok_s=batch * n / float(np.median(ours_s)),
                transformers_tok_s=batch * n / float(np.median(theirs_s)),
                ratio=float(np.median(ratios)),
                ratio_min=float(ratios.min()),
                ratio_max=float(ratios.max()),
                ziya_jax_prefill_s=float(np.median(prefill_s)),
                ziya_jax_step_ms=float(np.median((ours_s - prefill_s) / (n - 1))) * 1e3,
                transformers_s=float(np.median(theirs_s)),
            )
        )

    bandwidth = measure_bandwidth()
    llm_bytes = step_bytes(cfg)
    bound_step_ms = llm_bytes / bandwidth * 1e3
    for r in rows:
        r["ceiling_ratio"] = r.pop("transformers_s") / (r["ziya_jax_prefill_s"] + (n - 1) * bound_step_ms / 1e3)
    print(
        f"{'row':<12}{'ziya_jax tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}{'min-max':>12}{'step ms':>9}"
        f"{'prefill s':>11}{'ceiling':>9}"
    )
    for r in rows:
        print(
            f"{r['row']:<12}{r['ziya_jax_tok_s']:>16.1f}{r['transformers_tok_s']:>20.1f}{r['ratio']:>8.2f}"
            f"{r['ratio_min']:>7.2f}-{r['ratio_max']:.2f}{r['ziya_jax_step_ms']:>9.1f}{r['ziya_jax_prefill_s']:>11.2f}"
            f"{r['ceiling_ratio']:>9.2f}"
        )
    fraction = bound_step_ms / rows[0]["ziya_jax_step_ms"]
    print(
        f"ratios: median of {args.repeats} runs, ziya_jax and transformers interleaved; measured bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; LLM weights read {llm_bytes / 1e6:.0f} MB/token -> a {bound_step_ms:.1f} ms "
        f"step at the bound; ziya_jax's greedy b1 step reaches {fraction:.0%} of it"
    )
    profile = profile_rows(params, calls, rows, cfg, n, bandwidth, llm_bytes, args.profile) if args.profile else None
    int8 = int8_rows(params, cfg, n, args)
    result = dict(
        rows=rows,
        int8_rows=int8,
        profile=profile,
        new_tokens=n,
        repeats=args.repeats,
        bandwidth_gb_s=bandwidth / 1e9,
        llm_mb_per_token=llm_bytes / 1e6,
        bound_step_ms=bound_step_ms,
        batch1_step_fraction_of_bound=fraction,
        device=str(jax.devices()[0]),
    )
    print(json.dumps(result))
    return result


def profile_rows(
    params, calls: dict, rows: list[dict], cfg, n: int, bandwidth: float, llm_bytes: int, trace_dir: str
) -> dict:
    """Trace one call of each row and print where a decoding step's time goes: the ops of the decoding loop's body
    by category (CATEGORIES), in ms per step with the machine's cores summed and divided by their number, so the
    column adds up to the traced step (the loop's span in the trace; tracing slows it, the untraced step is printed
    below it); "idle cores" is what the cores did not spend in the loop's ops (waiting for a dependency, dispatch,
    the loop itself). The prefill, before the loop, is left out."""
    cores = len(os.sched_getaffinity(0))
    table = {}
    for name, batch, beams in ROWS:
        ids, mask, pixels = calls[name]
        dc = DecodeConfig(max_new_tokens=n, min_new_tokens=n, num_beams=beams, eos_token_id=2, pad_token_id=0)
        run = lambda: generate(params, cfg, ids, mask, pixels, dc=dc)
        events = trace_events(run, os.path.join(trace_dir, name.replace(" ", "_")))
        ops = hlo_ops(compiled_search(params, cfg, ids, mask, pixels, dc=dc).as_text())
        spent, first, last = dict.fromkeys(CATEGORIES, 0.0), float("inf"), 0.0
        for e in events:
            op = ops.get(e.get("args", {}).get("hlo_op")) if e.get("ph") == "X" else None
            if op is None or not op["in_loop"] or e["args"].get("hlo_module") != "jit__search":
                continue
            spent[_category(op)] += e.get("dur", 0.0) * 1e-6 / cores
            first, last = min(first, e["ts"]), max(last, e["ts"] + e.get("dur", 0.0))
        step_s = (last - first) * 1e-6 / n  # the loop's span: from its first op to its last
        per_step = {k: v / n for k, v in spent.items()}
        per_step["idle cores"] = max(step_s - sum(per_step.values()), 0.0)
        slots = cfg.num_query_tokens + 16 + n
        cache_bytes = 2 * cfg.llm.depth * batch * beams * cfg.llm.num_kv_heads * slots * cfg.llm.head_dim * 4
        table[name] = dict(
            step_ms=step_s * 1e3,
            ms={k: v * 1e3 for k, v in per_step.items()},
            bound_ms={
                "weight products": llm_bytes / bandwidth * 1e3,
                "attention over the cache": cache_bytes / bandwidth * 1e3,
            },
        )
    print(
        f"profile: ms per decoding step (the traced loop, {cores} cores summed / {cores}); "
        "bound: the bytes read at the measured bandwidth"
    )
    print(f"{'':<28}" + "".join(f"{name:>22}" for name, _, _ in ROWS))
    for category in CATEGORIES:
        cells = []
        for name, _, _ in ROWS:
            bound = table[name]["bound_ms"].get(category)
            cell = f"{table[name]['ms'][category]:.2f}" + (f" (bound {bound:.2f})" if bound is not None else "")
            cells.append(f"{cell:>22}")
        print(f"{category:<28}" + "".join(cells))
    print(f"{'traced step':<28}" + "".join(f"{table[name]['step_ms']:>22.2f}" for name, _, _ in ROWS))
    print(f"{'untraced step':<28}" + "".join(f"{r['ziya_jax_step_ms']:>22.2f}" for r in rows))
    return table


def _category(op: dict) -> str:
    """A loop-body op's category. XLA drops the JAX path of many products, so a product is told by its result: a
    weight product is a matrix [rows, features], attention's products are batched over heads (rank 3 or more)."""
    if "dot" in op["opcodes"]:
        return "weight products" if op["rank"] == 2 else "attention over the cache"
    if op["opcodes"] & {"dynamic-update-slice", "scatter"}:
        return "cache and state writes"
    if op["opcodes"] <= {"copy", "transpose", "bitcast", "parameter", "fusion", "get-tuple-element"}:
        return "copies"
    if "language_model" in op["op_name"]:
        return "norms, RoPE, softmax, SiLU"
    return "sampling, beam bookkeeping"


def int8_rows(params, cfg, n: int, args) -> list[dict]:
    """Greedy batch 1 and 8 on float32 and on int8 weights, each pair timed back to back."""
    qparams, qcfg = quantize(params, cfg, "int8")
    q, image_token, size = cfg.num_query_tokens, cfg.image_token_id, cfg.vision.image_size
    rng = np.random.default_rng(1)
    rows, traces = [], {}
    for batch in (1, 8):
        ids = np.concatenate([np.full((batch, q), image_token), rng.integers(3, image_token, (batch, 16))], 1)
        pixels = jnp.asarray(rng.normal(size=(batch, 1, size, size, 3)).astype(np.float32))
        row = dict(row=f"greedy b{batch}")
        for name, p, c in (("float32", params, cfg), ("int8", qparams, qcfg)):
            run = lambda k: generate(
                p,
                c,
                ids,
                np.ones_like(ids),
                pixels,
                dc=DecodeConfig(max_new_tokens=k, min_new_tokens=k, eos_token_id=2),
            )
            full, prefill = best_of(lambda: run(n), args.repeats), best_of(lambda: run(1), args.repeats)
            row.update(
                {
                    f"{name}_tok_s": batch * n / full,
                    f"{name}_step_ms": (full - prefill) / (n - 1) * 1e3,
                    f"{name}_prefill_s": prefill,
                }
            )
            if args.profile:  # a text prompt: its prefill is small beside n steps
                text = lambda: generate(p, c, ids[:, q:], dc=DecodeConfig(max_new_tokens=n, min_new_tokens=n))
                text()
                events = trace_events(text, os.path.join(args.profile, f"{name}_b{batch}"))
                traces[f"{name}, greedy b{batch}"] = (device_time(events, n), (full - prefill) / (n - 1))
        row["tok_s_ratio"] = row["int8_tok_s"] / row["float32_tok_s"]
        row["step_ratio"] = row["float32_step_ms"] / row["int8_step_ms"]
        rows.append(row)
    print(
        f"{'ziya_jax':<12}{'f32 tok/s':>11}{'int8 tok/s':>12}{'ratio':>7}{'f32 step ms':>13}{'int8 step ms':>14}"
        f"{'ratio':>7}{'prefill s f32/int8':>20}"
    )
    for r in rows:
        print(
            f"{r['row']:<12}{r['float32_tok_s']:>11.1f}{r['int8_tok_s']:>12.1f}{r['tok_s_ratio']:>7.2f}"
            f"{r['float32_step_ms']:>13.1f}{r['int8_step_ms']:>14.1f}{r['step_ratio']:>7.2f}"
            f"{r['float32_prefill_s']:>11.2f}/{r['int8_prefill_s']:.2f}"
        )
    for name, (summary, step_s) in traces.items():
        print(f"{name}, a 16-token text prompt and {n} new tokens (prefill included), per token:")
        print_device_time(summary, step_s)
    return rows
