"""Model calls for evaluation, batched and jitted with static shapes: every batch is padded to `batch_size` rows
and every prompt to one length per call (rounded up to `bucket`), so a task compiles its decoder once.

- `Generator`: Ziya-format prompts with one image each -> decoded answers (greedy or beam, ziya_jax.decode).
- `choice_logprobs`: the log-likelihood of each given continuation (ScienceQA: answers constrained to choices).
- `itc_features` / `itm_scores`: the stage-1 heads for retrieval (BLIP-2's ITC similarity and ITM logit).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ziya_jax.config import ModelConfig
from ziya_jax.data import formats
from ziya_jax.decode import DecodeConfig, generate
from ziya_jax.model import ZiyaVisual

RETRIEVAL_TEXT_LEN = 32  # BLIP-2's max_txt_len for ITC/ITM


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One question about one image: `query` is the user's text (no placeholder), `pixels` [S, S, 3]
    normalised. The model input is built from it as training builds it (formats.prompt_input)."""

    query: str
    pixels: np.ndarray


def round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def _batches(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class Generator:
    """Decodes answers to many prompts: rows padded to batch_size, prompts to one bucketed length."""

    def __init__(
        self, params, cfg: ModelConfig, tokenizer, qformer_tokenizer=None, *, batch_size: int = 32, bucket: int = 16
    ):
        if cfg.variant == "chat" and qformer_tokenizer is None:
            raise ValueError("a Chat model needs the Q-Former tokenizer")
        self.params, self.cfg, self.tok, self.qtok = params, cfg, tokenizer, qformer_tokenizer
        self.batch_size, self.bucket = batch_size, bucket

    def decode(self, tokens) -> str:
        """New tokens -> text, without EOS and without ids the tokenizer has no piece for (the image
        placeholder, which an untrained model may emit)."""
        keep = [
            int(t)
            for t in tokens
            if t != self.tok.eos_id and t != self.cfg.image_token_id and 0 <= t < self.tok.vocab_size
        ]
        return self.tok.decode(keep).strip()

    def inputs(self, prompt: Prompt, max_new_tokens: int) -> dict[str, np.ndarray]:
        return formats.prompt_input(
            [formats.Turn(prompt.query, None)], 1, self.tok, self.qtok, self.cfg, max_new_tokens
        )

    def _padded(
        self, prompts: Sequence[Prompt], inputs: list[dict], ids: list[list[int]], length: int, start: int, stop: int
    ):
        rows = list(range(start, stop)) + [stop - 1] * (self.batch_size - (stop - start))  # repeat the last row
        input_ids = np.full((len(rows), length), self.tok.pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for r, i in enumerate(rows):
            input_ids[r, length - len(ids[i]) :] = ids[i]
            mask[r, length - len(ids[i]) :] = 1
        pixels = np.stack([prompts[i].pixels for i in rows])[:, None].astype(np.float32)
        qformer = {k: np.stack([inputs[i][k] for i in rows]) for k in ("qformer_ids", "qformer_mask") if k in inputs[0]}
        return input_ids, mask, pixels, qformer

    def __call__(self, prompts: Sequence[Prompt], dc: DecodeConfig, desc: str = "generate") -> list[str]:
        if not prompts:
            return []
        dc = dataclasses.replace(dc, eos_token_id=self.tok.eos_id, pad_token_id=self.tok.pad_id)
        inputs = [self.inputs(p, dc.max_new_tokens) for p in prompts]
        ids = [list(x["input_ids"]) for x in inputs]
        length = round_up(max(map(len, ids)), self.bucket)
        if length + dc.max_new_tokens > self.cfg.llm.max_position_embeddings:
            length = max(map(len, ids))  # the bucket would not fit; every prompt does (prompt_input checked)
        answers = []
        for start, stop in tqdm(_batches(len(prompts), self.batch_size), desc=desc, unit="batch", leave=False):
            input_ids, mask, pixels, qformer = self._padded(prompts, inputs, ids, length, start, stop)
            tokens, lengths = generate(self.params, self.cfg, input_ids, mask, pixels, dc=dc, **qformer)
            for r in range(stop - start):
                answers.append(self.decode(tokens[r, : lengths[r]]))
        return answers

    def choice_logprobs(
        self, prompts: Sequence[Prompt], choices: Sequence[Sequence[str]], desc: str = "score choices"
    ) -> list[list[float]]:
        """log p(choice + EOS | prompt) summed over the choice's tokens, for every choice of every prompt."""
        flat = [(i, c) for i, cs in enumerate(choices) for c in cs]
        if not flat:
            return [[] for _ in prompts]
        prompt_inputs = [self.inputs(p, 0) for p in prompts]
        seqs, targets, sub_inputs = [], [], []
        for i, c in flat:
            answer = self.tok.encode(c) + [self.tok.eos_id]
            seqs.append(list(prompt_inputs[i]["input_ids"]) + answer)
            targets.append(len(answer))
            sub_inputs.append(prompt_inputs[i])
        length = round_up(max(map(len, seqs)), self.bucket)
        if length > self.cfg.llm.max_position_embeddings:
            raise ValueError(
                f"a prompt with a choice has {max(map(len, seqs))} tokens; the model's context is "
                f"{self.cfg.llm.max_position_embeddings}"
            )
        scores = []
        sub = [prompts[i] for i, _ in flat]
        for start, stop in tqdm(_batches(len(flat), self.batch_size), desc=desc, unit="batch", leave=False):
            input_ids, mask, pixels, qformer = self._padded(sub, sub_inputs, seqs, length, start, stop)
            answer_mask = np.zeros_like(mask)
            rows = list(range(start, stop)) + [stop - 1] * (self.batch_size - (stop - start))
            for r, k in enumerate(rows):
                answer_mask[r, length - targets[k] :] = 1
            logp = _sequence_logprob(
                self.params,
                input_ids,
                mask,
                pixels,
                qformer.get("qformer_ids"),
                qformer.get("qformer_mask"),
                jnp.asarray(answer_mask),
                cfg=self.cfg,
            )
            scores.extend(float(x) for x in np.asarray(logp)[: stop - start])
        out, k = [[] for _ in prompts], 0
        for i, c in flat:
            out[i].append(scores[k])
            k += 1
        return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sequence_logprob(params, input_ids, mask, pixels, qformer_ids, qformer_mask, answer_mask, cfg: ModelConfig):
    """Sum of log p(token_t | tokens_<t) over the positions answer_mask marks (right-aligned rows)."""
    logits = ZiyaVisual(cfg).apply({"params": params}, input_ids, mask, pixels, qformer_ids, qformer_mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(answer_mask[:, 1:] > 0, token_logp, 0.0).sum(-1)


def has_itc_heads(params) -> bool:
    return "vision_proj" in params and "text_proj" in params


def _with_heads(cfg: ModelConfig) -> ModelConfig:
    if cfg.qformer.pretrain_heads:
        return cfg
    return dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, pretrain_heads=True))


def _l2(x):
    return x / jnp.maximum(jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)


def _image_side(module: ZiyaVisual, pixels):
    embeds = module.vision_model(pixels, True)
    queries = jnp.broadcast_to(module.query_tokens, (pixels.shape[0], *module.query_tokens.shape[1:]))
    out = module.qformer(queries, None, None, embeds, "bidirectional", True)
    return _l2(module.vision_proj(out)), embeds


def _text_side(module: ZiyaVisual, ids, mask):
    return _l2(module.text_proj(module.qformer(None, ids, mask, None, "bidirectional", True)[:, 0]))


def _itm(module: ZiyaVisual, image_embeds, ids, mask):
    queries = jnp.broadcast_to(module.query_tokens, (ids.shape[0], *module.query_tokens.shape[1:]))
    out = module.qformer(queries, ids, mask, image_embeds, "bidirectional", True)
    return module.itm_head(out[:, : module.cfg.num_query_tokens]).mean(1)[:, 1].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _image_features(params, pixels, cfg):
    return ZiyaVisual(cfg).apply({"params": params}, pixels, method=_image_side)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _text_features(params, ids, mask, cfg):
    return ZiyaVisual(cfg).apply({"params": params}, ids, mask, method=_text_side)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _itm_logits(params, image_embeds, ids, mask, cfg):
    return ZiyaVisual(cfg).apply({"params": params}, image_embeds, ids, mask, method=_itm)


def _run_batched(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int, desc: str):
    """fn over row batches padded to batch_size (one compilation), outputs trimmed and concatenated."""
    n, outs = len(arrays[0]), []
    for start, stop in tqdm(_batches(n, batch_size), desc=desc, unit="batch", leave=False):
        pad = batch_size - (stop - start)
        batch = [
            np.concatenate([a[start:stop], np.repeat(a[stop - 1 : stop], pad, 0)]) if pad else a[start:stop]
            for a in arrays
        ]
        res = fn(*batch)
        outs.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[: stop - start], res))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)


def encode_texts(texts: Sequence[str], qformer_tokenizer, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    length = min(RETRIEVAL_TEXT_LEN, cfg.qformer.max_position_embeddings)
    enc = [formats.encode_qformer_text(t, qformer_tokenizer, length, truncate="right") for t in texts]
    return np.stack([e["ids"] for e in enc]), np.stack([e["mask"] for e in enc])


def itc_similarity(
    params,
    cfg: ModelConfig,
    pixels: np.ndarray,
    texts: Sequence[str],
    qformer_tokenizer,
    *,
    batch_size: int = 32,
    keep_image_embeds: bool = False,
):
    """(sim [images, texts] = max over queries of the cosine of query and text features, text ids, text mask,
    image embeddings or None). Needs the stage-1 heads (vision_proj, text_proj)."""
    if not has_itc_heads(params):
        raise ValueError("retrieval needs the stage-1 heads (vision_proj, text_proj) in the parameters")
    if qformer_tokenizer is None:
        raise ValueError("retrieval needs the Q-Former tokenizer")
    cfg = _with_heads(cfg)
    feats, embeds = _run_batched(lambda p: _image_features(params, p, cfg=cfg), [pixels], batch_size, "images")
    ids, mask = encode_texts(texts, qformer_tokenizer, cfg)
    text_feats = _run_batched(lambda i, m: _text_features(params, i, m, cfg=cfg), [ids, mask], batch_size, "texts")
    sim = np.einsum("iqd,td->itq", feats, text_feats).max(-1)
    return sim, ids, mask, embeds if keep_image_embeds else None


def itm_scorer(
    params, cfg: ModelConfig, image_embeds: np.ndarray, ids: np.ndarray, mask: np.ndarray, batch_size: int = 32
):
    """pair_score(images, texts) -> ITM match logits, for retrieval.rerank."""
    cfg = _with_heads(cfg)

    def score(img_idx, txt_idx):
        fn = lambda e, i, m: _itm_logits(params, e, i, m, cfg=cfg)
        return _run_batched(fn, [image_embeds[img_idx], ids[txt_idx], mask[txt_idx]], batch_size, "ITM re-rank")

    return score
