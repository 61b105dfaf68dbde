"""Greedy, beam and sampling decoding, each one jitted program: the prompt (with its images) is prefilled in one
pass into a preallocated KV cache, then a lax.while_loop emits one token per step.

Beam search follows the semantics of transformers' `generate` (2*K candidates per step, finished hypotheses
scored sum(logprobs) / new_length ** length_penalty, the same early-stop heuristic), so results compare token for
token. Prompts are left-padded (done here from any attention mask); RoPE positions count valid tokens only, so
each row decodes as it would alone. Shapes are static: one compilation per (batch, prompt length, settings).
The model runs scanned over its stacked layers, or unrolled on per-layer weights (the ViT's, the Q-Former's and
the LLM's) when given decode_params(params): faster on CPU, where a scanned step copies every layer's weights out
of the stack before reading them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np

from ziya_jax.config import ModelConfig
from ziya_jax.model import ZiyaVisual, default_positions
from ziya_jax.model.layers import unroll_layers
from ziya_jax.model.llama import init_cache

NEG = -1.0e9
# Where tokens go while a streaming generate() runs (XLA calls back from its own thread, so a plain global;
# one streaming generate at a time).
_STREAM = {"on_token": None}


def _emit(tokens):
    _STREAM["on_token"](int(tokens[0]))


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # over the valid prompt tokens and everything generated
    length_penalty: float = 1.0  # beam search: score = sum(logprobs) / new_length ** length_penalty
    early_stopping: bool = False  # beam search: True stops once num_beams hypotheses are finished
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError("num_beams and max_new_tokens must be >= 1")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling is not supported; choose num_beams=1 or do_sample=False")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("need temperature > 0, 0 < top_p <= 1, repetition_penalty > 0")


# The public Ziya demo's sampling settings.
ZIYA_DEMO = DecodeConfig(max_new_tokens=128, do_sample=True, top_p=0.1, temperature=0.7, repetition_penalty=1.18)


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray, pad_token_id: int):
    """Move every row's valid tokens to the right end (stable), so the last column is each row's last token."""
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
    order = np.argsort(attention_mask, axis=1, kind="stable")
    ids = np.take_along_axis(input_ids, order, axis=1)
    mask = np.take_along_axis(attention_mask, order, axis=1)
    if not mask[:, -1].all():
        raise ValueError("a prompt has no valid tokens")
    return np.where(mask, ids, pad_token_id).astype(np.int32), mask.astype(np.int32)


def check_placeholders(input_ids, attention_mask, images_per_row: int, cfg: ModelConfig):
    """Each row must hold exactly num_query_tokens image placeholders per image (the model would otherwise
    silently reuse or drop image features)."""
    counts = ((np.asarray(input_ids) == cfg.image_token_id) & np.asarray(attention_mask).astype(bool)).sum(1)
    want = images_per_row * cfg.num_query_tokens
    if (counts != want).any():
        raise ValueError(
            f"rows hold {counts.tolist()} image placeholders (id {cfg.image_token_id}); "
            f"{images_per_row} image(s) x {cfg.num_query_tokens} queries need {want} each"
        )


def check_inputs(ids, mask, pixel_values, qformer_ids, qformer_mask, cfg: ModelConfig):
    """Ids past an embedding table or non-finite pixels would decode to garbage without an error: refuse them."""
    tables = [("token ids", ids, mask, cfg.llm.vocab_size)]
    if qformer_ids is not None:
        qmask = np.ones_like(qformer_ids) if qformer_mask is None else qformer_mask
        tables.append(("Q-Former ids", qformer_ids, qmask, cfg.qformer.vocab_size))
    for name, values, valid, size in tables:
        values = np.asarray(values)[np.asarray(valid).astype(bool)]
        bad = values[(values < 0) | (values >= size)]
        if bad.size:
            raise ValueError(f"{name} must be in [0, {size}): got {sorted(set(bad.tolist()))[:5]}")
    if pixel_values is not None and not np.isfinite(np.asarray(pixel_values)).all():
        raise ValueError("pixel values hold NaN or infinity")


def process_logits(logits, seen, step, dc: DecodeConfig):
    """Repetition penalty and min_new_tokens (all modes), then temperature / top-k / top-p when sampling."""
    if dc.repetition_penalty != 1.0:
        penalised = jnp.where(logits < 0, logits * dc.repetition_penalty, logits / dc.repetition_penalty)
        logits = jnp.where(seen, penalised, logits)
    if dc.min_new_tokens:
        logits = logits.at[:, dc.eos_token_id].set(
            jnp.where(step < dc.min_new_tokens, -jnp.inf, logits[:, dc.eos_token_id])
        )
    if not dc.do_sample:
        return logits
    logits = logits / dc.temperature
    if dc.top_k:
        kth = jax.lax.top_k(logits, min(dc.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if dc.top_p < 1.0:
        logits = nucleus(logits, dc.top_p)
    return logits


def nucleus(logits, top_p):
    """Top-p filtering of logits [B, V] (transformers' TopPLogitsWarper): the least likely tokens whose total
    probability is at most 1 - top_p get -inf; top_p is a number or one per row [B, 1]."""
    sorted_logits = jnp.sort(logits, axis=-1)  # ascending
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    removable = cumulative <= 1.0 - top_p
    removable = removable.at[:, -1].set(False)  # always keep the most likely token
    threshold = jnp.min(jnp.where(removable, jnp.inf, sorted_logits), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _prefill(model, params, input_ids, mask, pixel_values, qformer_ids, qformer_mask, total):
    features = None
    if pixel_values is not None:
        features = model.apply(
            {"params": params}, pixel_values, qformer_ids, qformer_mask, method=ZiyaVisual.encode_images
        )
    embeds = model.apply({"params": params}, input_ids, features, method=ZiyaVisual.embed_inputs)
    b, t = input_ids.shape
    cache = init_cache(model.cfg.llm, b, total, embeds.dtype, unrolled=model.unrolled)
    key_mask = jnp.zeros((b, total), jnp.int32).at[:, :t].set(mask)
    positions = default_positions(mask)
    logits, cache = model.apply(
        {"params": params}, embeds, positions, key_mask, cache, 0, last_only=True, method=ZiyaVisual.language
    )
    return logits[:, -1], cache, key_mask, positions[:, -1] + 1


def _step(model, params, tokens, cache, key_mask, positions, slot):
    """One new token per row at cache slot `slot` -> (logits [B, V], cache, key_mask)."""
    key_mask = jax.lax.dynamic_update_slice_in_dim(key_mask, jnp.ones((key_mask.shape[0], 1), jnp.int32), slot, 1)
    embeds = model.apply({"params": params}, tokens[:, None], None, method=ZiyaVisual.embed_inputs)
    logits, cache = model.apply(
        {"params": params}, embeds, positions[:, None], key_mask, cache, slot, method=ZiyaVisual.language
    )
    return logits[:, 0], cache, key_mask


def _seen_tokens(input_ids, mask, vocab):
    seen = jnp.zeros((input_ids.shape[0], vocab), bool)
    return seen.at[jnp.arange(input_ids.shape[0])[:, None], input_ids].max(mask.astype(bool))


@functools.partial(jax.jit, static_argnames=("cfg", "dc", "stream"))
def _search(
    params,
    input_ids,
    mask,
    pixel_values,
    qformer_ids,
    qformer_mask,
    rng,
    cfg: ModelConfig,
    dc: DecodeConfig,
    stream: bool = False,
):
    model = ZiyaVisual(cfg, unrolled=is_unrolled(params))
    b, t = input_ids.shape
    total = t + dc.max_new_tokens
    logits, cache, key_mask, positions = _prefill(
        model, params, input_ids, mask, pixel_values, qformer_ids, qformer_mask, total
    )
    seen = _seen_tokens(input_ids, mask, logits.shape[-1])
    if dc.num_beams == 1:
        return _greedy_or_sample(model, params, logits, cache, key_mask, positions, seen, rng, t, dc, stream)
    return _beam(model, params, logits, cache, key_mask, positions, seen, t, dc)


def _greedy_or_sample(model, params, logits, cache, key_mask, positions, seen, rng, prompt_len, dc, stream):
    b = logits.shape[0]
    tokens = jnp.full((b, dc.max_new_tokens), dc.pad_token_id, jnp.int32)
    state = dict(
        step=0,
        logits=logits,
        cache=cache,
        key_mask=key_mask,
        positions=positions,
        seen=seen,
        rng=rng,
        tokens=tokens,
        finished=jnp.zeros((b,), bool),
    )

    def cond(s):
        return (s["step"] < dc.max_new_tokens) & ~jnp.all(s["finished"])

    def body(s):
        scores = process_logits(s["logits"], s["seen"], s["step"], dc)
        rng, key = jax.random.split(s["rng"])
        if dc.do_sample:
            nxt = jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
        else:
            nxt = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        nxt = jnp.where(s["finished"], dc.pad_token_id, nxt)
        if stream:
            jax.experimental.io_callback(_emit, None, nxt, ordered=True)
        logits, cache, key_mask = _step(
            model, params, nxt, s["cache"], s["key_mask"], s["positions"], prompt_len + s["step"]
        )
        return dict(
            step=s["step"] + 1,
            logits=logits,
            cache=cache,
            key_mask=key_mask,
            positions=s["positions"] + 1,
            seen=s["seen"].at[jnp.arange(b), nxt].set(True),
            rng=rng,
            tokens=s["tokens"].at[:, s["step"]].set(nxt),
            finished=s["finished"] | (nxt == dc.eos_token_id),
        )

    out = jax.lax.while_loop(cond, body, state)
    return out["tokens"], _lengths(out["tokens"], out["step"], dc)


def _lengths(tokens, steps, dc):
    """New tokens per row up to and including the first EOS (or all emitted steps)."""
    is_eos = tokens == dc.eos_token_id
    first = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1) + 1, steps)
    return jnp.minimum(first, steps).astype(jnp.int32)


def _beam(model, params, logits, cache, key_mask, positions, seen, prompt_len, dc):
    b, k, n = logits.shape[0], dc.num_beams, dc.max_new_tokens
    vocab = logits.shape[-1]
    expand = lambda x: jnp.repeat(x, k, axis=0)  # [B, ...] -> [B*K, ...], beams of a row adjacent
    cache = jax.tree_util.tree_map(lambda c: jnp.repeat(c, k, axis=-4), cache)  # [(layers,) B, heads, S, D]
    scores0 = jnp.tile(jnp.array([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1))
    state = dict(
        step=0,
        logits=expand(logits),
        cache=cache,
        key_mask=expand(key_mask),
        positions=expand(positions),
        seen=expand(seen),
        run_tokens=jnp.full((b, k, n), dc.pad_token_id, jnp.int32),
        run_scores=scores0,
        fin_tokens=jnp.full((b, k, n), dc.pad_token_id, jnp.int32),
        fin_scores=jnp.full((b, k), NEG),
        fin_lengths=jnp.zeros((b, k), jnp.int32),
        fin_flags=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b,), bool),
        go=jnp.array(True),
    )
    first_k = jnp.arange(2 * k) < k

    def body(s):
        step = s["step"]
        logp = jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1)
        logp = process_logits(logp, s["seen"], step, dc).reshape(b, k, vocab) + s["run_scores"][..., None]
        cand_scores, flat = jax.lax.top_k(logp.reshape(b, k * vocab), 2 * k)
        origin, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand_tokens = jnp.take_along_axis(s["run_tokens"], origin[..., None], axis=1).at[:, :, step].set(token)
        hits = (token == dc.eos_token_id) | (step + 1 >= n)

        # Live beams: the best K candidates that did not stop.
        live_scores, live = jax.lax.top_k(cand_scores + hits * NEG, k)
        run_tokens = jnp.take_along_axis(cand_tokens, live[..., None], axis=1)
        run_origin = jnp.take_along_axis(origin, live, axis=1)

        # Finished hypotheses: stopped candidates among the top K, length-normalised, kept if among the best K.
        normed = cand_scores / ((step + 1.0) ** dc.length_penalty)
        normed += jnp.where(hits & first_k[None] & s["improvable"][:, None], 0.0, NEG)
        if dc.early_stopping:
            normed += jnp.where(jnp.all(s["fin_flags"], -1, keepdims=True), NEG, 0.0)
        merged_scores = jnp.concatenate([s["fin_scores"], normed], axis=1)
        merged_tokens = jnp.concatenate([s["fin_tokens"], cand_tokens], axis=1)
        merged_lengths = jnp.concatenate([s["fin_lengths"], jnp.full((b, 2 * k), step + 1, jnp.int32)], axis=1)
        merged_flags = jnp.concatenate([s["fin_flags"], hits & first_k[None]], axis=1)
        fin_scores, keep = jax.lax.top_k(merged_scores, k)
        take = lambda x: jnp.take_along_axis(x, keep if x.ndim == 2 else keep[..., None], axis=1)

        # Can a live beam still beat the worst finished one?
        best_live = live_scores[:, 0] / ((step + 1.0) ** dc.length_penalty)
        fin_flags = take(merged_flags)
        worst = jnp.where(fin_flags, jnp.min(fin_scores, -1, keepdims=True), NEG)
        improvable = s["improvable"] & jnp.any(best_live[:, None] > worst, axis=-1)
        go = jnp.any(improvable) & ~jnp.all(hits) & (step + 1 < n)
        if dc.early_stopping:
            go &= ~jnp.all(fin_flags)

        rows = (run_origin + jnp.arange(b)[:, None] * k).reshape(-1)
        cache = jax.tree_util.tree_map(lambda c: jnp.take(c, rows, axis=-4), s["cache"])
        next_tokens = run_tokens[:, :, step].reshape(-1)
        seen = s["seen"][rows].at[jnp.arange(b * k), next_tokens].set(True)
        logits, cache, key_mask = _step(
            model, params, next_tokens, cache, s["key_mask"][rows], s["positions"], prompt_len + step
        )
        return dict(
            step=step + 1,
            logits=logits,
            cache=cache,
            key_mask=key_mask,
            positions=s["positions"] + 1,
            seen=seen,
            run_tokens=run_tokens,
            run_scores=live_scores,
            fin_tokens=take(merged_tokens),
            fin_scores=fin_scores,
            fin_lengths=take(merged_lengths),
            fin_flags=fin_flags,
            improvable=improvable,
            go=go,
        )

    out = jax.lax.while_loop(lambda s: s["go"], body, state)
    return out["fin_tokens"][:, 0], out["fin_lengths"][:, 0]


def decode_params(params):
    """params with the layers of the ViT, the Q-Former and the LLM unrolled (a copy of their weights), for generate
    to run per layer: convert once per loaded model and keep this instead of the stacked params."""
    if is_unrolled(params):
        return params
    return {
        **params,
        "vision_model": unroll_layers(params["vision_model"]),
        "qformer": unroll_layers(params["qformer"], "layer"),
        "language_model": unroll_layers(params["language_model"]),
    }


def is_unrolled(params) -> bool:
    """Whether params come from decode_params (ZiyaVisual(unrolled=True) runs them)."""
    return "layers" not in params["language_model"]


def generate(
    params,
    cfg: ModelConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    qformer_ids=None,
    qformer_mask=None,
    dc: DecodeConfig = DecodeConfig(),
    rng=None,
    on_token=None,
):
    """-> (tokens [B, max_new_tokens] int32, lengths [B]): the new tokens of each row; positions past a row's
    length hold pad_token_id. Prompts may be padded on either side (attention_mask marks valid tokens).
    on_token(id), for one prompt without beam search, is called with each token as the loop produces it.
    params: stacked as trained, or from decode_params (faster on CPU)."""
    args = _search_args(cfg, input_ids, attention_mask, pixel_values, qformer_ids, qformer_mask, dc=dc, rng=rng)
    if on_token is not None and (dc.num_beams > 1 or args["input_ids"].shape[0] != 1):
        raise ValueError("streaming (on_token) needs one prompt and num_beams=1")
    _STREAM["on_token"] = on_token
    try:
        tokens, lengths = _search(params, **args, stream=on_token is not None)
        return np.asarray(tokens), np.asarray(lengths)
    finally:
        _STREAM["on_token"] = None


def compiled_search(params, cfg: ModelConfig, *inputs, dc: DecodeConfig = DecodeConfig()):
    """The compiled program generate(params, cfg, *inputs, dc=dc) runs (inputs: input_ids, and optionally
    attention_mask, pixel_values, qformer_ids, qformer_mask as generate takes them); its as_text() names the ops a
    profiler trace shows."""
    args = _search_args(cfg, *inputs, dc=dc)
    return _search.lower(params, **args).compile()


def _search_args(
    cfg, input_ids, attention_mask=None, pixel_values=None, qformer_ids=None, qformer_mask=None, *, dc, rng=None
) -> dict:
    """generate's inputs checked and left-padded, as _search takes them."""
    input_ids = np.asarray(input_ids)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    ids, mask = left_pad(input_ids, attention_mask, dc.pad_token_id)
    check_placeholders(ids, mask, 0 if pixel_values is None else np.shape(pixel_values)[1], cfg)
    check_inputs(ids, mask, pixel_values, qformer_ids, qformer_mask, cfg)
    if ids.shape[1] + dc.max_new_tokens > cfg.llm.max_position_embeddings:
        raise ValueError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({dc.max_new_tokens}) exceeds the "
            f"model's context of {cfg.llm.max_position_embeddings}"
        )
    return dict(
        input_ids=jnp.asarray(ids),
        mask=jnp.asarray(mask),
        pixel_values=pixel_values,
        qformer_ids=qformer_ids,
        qformer_mask=qformer_mask,
        rng=jax.random.key(0) if rng is None else rng,
        cfg=cfg,
        dc=dc,
    )
