"""Decode throughput of ziya_jax vs transformers' generate on the same converted weights, in one run.

Benchmark model (realistic shape, random weights): ViT-B/16-like tower at 224, a 6-layer 768-wide Q-Former with 32
queries, a 12-layer 768-wide LLaMA with vocab 32000. Rows: greedy batch 1, greedy batch 8, beam 4 (batch 1), each
forced to emit exactly --new-tokens tokens (min_new_tokens) so both sides do the same work. Compilation and warm-up
are excluded; ziya_jax runs on decode_params (per-layer weights, made once per model). The batch-1 roofline: every
decode step reads all LLM weights (one row of the embedding table), so tokens/s <= bandwidth / bytes; the rows'
tokens/s also pay the prefill (image encoding and prompt), the bound does not. Each row's ceiling is the ratio
ziya_jax would reach with its own prefill (timed alone: one new token) and every later step at that bound, since
all rows of a step share one read of the weights: what the image encoder, matmul-bound on both sides, leaves.

Then ziya_jax alone, float32 against int8 weights (ziya_jax.quantize), greedy batch 1 and 8, timed back to back:
tokens/s (prefill included) and the decoding step alone ((time for N tokens - time for 1) / (N - 1)).
--profile DIR traces decoding a text prompt with each and prints where a token's time goes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ziya_jax.bench.trace import device_time, print_device_time, trace_events
from ziya_jax.convert import load_hf
from ziya_jax.decode import DecodeConfig, decode_params, generate
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
    gemv(x, w).block_until_ready()
    best = min(_timed(lambda: gemv(x, w).block_until_ready()) for _ in range(5))
    return n_bytes / best


def _best(fn, repeats: int) -> float:
    """Best of `repeats` timed calls, after one untimed call (compilation, warm-up)."""
    fn()
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
    rows = []
    for name, batch, beams in (("greedy b1", 1, 1), ("greedy b8", 8, 1), ("beam4 b1", 1, 4)):
        ids = np.concatenate([np.full((batch, q), image_token), rng.integers(3, image_token, (batch, 16))], 1)
        mask = np.ones_like(ids)
        pixels = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
        t_ids, t_mask, t_pix = map(torch.from_numpy, (ids, mask, pixels))

        def ours(new_tokens):
            dc = DecodeConfig(
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams, eos_token_id=2, pad_token_id=0
            )
            return generate(params, cfg, ids, mask, jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None], dc=dc)

        def theirs(new_tokens):
            with torch.no_grad():
                return model.generate(
                    pixel_values=t_pix,
                    input_ids=t_ids,
                    attention_mask=t_mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    num_beams=beams,
                    do_sample=False,
                    eos_token_id=2,
                    pad_token_id=0,
                )

        ours_s, ours_prefill_s = _best(lambda: ours(n), args.repeats), _best(lambda: ours(1), args.repeats)
        theirs_s = _best(lambda: theirs(n), args.repeats)
        tokens = batch * n
        rows.append(
            dict(
                row=name,
                ziya_jax_tok_s=tokens / ours_s,
                transformers_tok_s=tokens / theirs_s,
                ratio=theirs_s / ours_s,
                ziya_jax_prefill_s=ours_prefill_s,
                transformers_s=theirs_s,
            )
        )

    bandwidth = measure_bandwidth()
    read = count_params(cfg)["language_model"]  # per token: every LLM weight, of the embedding table one row
    read -= 0 if cfg.llm.tie_word_embeddings else (cfg.llm.vocab_size - 1) * cfg.llm.width
    llm_bytes = read * np.dtype(cfg.param_dtype).itemsize
    bound = bandwidth / llm_bytes
    for r in rows:
        r["ceiling_ratio"] = r.pop("transformers_s") / (r["ziya_jax_prefill_s"] + (n - 1) / bound)
    print(f"{'row':<12}{'ziya_jax tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}{'prefill s':>11}{'ceiling':>9}")
    for r in rows:
        print(
            f"{r['row']:<12}{r['ziya_jax_tok_s']:>16.1f}{r['transformers_tok_s']:>20.1f}{r['ratio']:>8.2f}"
            f"{r['ziya_jax_prefill_s']:>11.2f}{r['ceiling_ratio']:>9.2f}"
        )
    fraction = rows[0]["ziya_jax_tok_s"] / bound
    print(
        f"measured bandwidth {bandwidth / 1e9:.1f} GB/s; LLM weights read {llm_bytes / 1e6:.0f} MB/token -> "
        f"batch-1 bound {bound:.1f} tok/s; ziya_jax greedy b1 reaches {fraction:.0%} of it"
    )
    int8 = int8_rows(params, cfg, n, args)
    result = dict(
        rows=rows,
        int8_rows=int8,
        new_tokens=n,
        bandwidth_gb_s=bandwidth / 1e9,
        llm_mb_per_token=llm_bytes / 1e6,
        batch1_bound_tok_s=bound,
        batch1_fraction_of_bound=fraction,
        device=str(jax.devices()[0]),
    )
    print(json.dumps(result))
    return result


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
            full, prefill = _best(lambda: run(n), args.repeats), _best(lambda: run(1), args.repeats)
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
