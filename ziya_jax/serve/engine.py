"""Continuous batching: many requests share one jitted decoding step.

The engine owns a KV cache of `slots` rows, each as long as the model's context. A request is prefilled alone
(its images through the ViT and Q-Former one at a time, then its prompt, right-padded to a bucket length) and its
cache is copied into a free row; one jitted step then advances every row by one token. A row whose request
finished (EOS, max_tokens, a stop string seen by the caller, or a cancel) is freed and refilled before the next
step. Shapes never depend on the requests: the step always runs all rows, sampling settings are per-row arrays,
and prompts compile once per bucket (powers of two from 64, and the context), so no request triggers a
recompile after the first of its bucket. Each row reads only its own cache, so a greedy request's tokens do not
depend on the requests beside it.

All JAX work runs on the engine's own thread; submit() and cancel() may be called from any thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import prometheus_client as prom

from ziya_jax.config import ModelConfig
from ziya_jax.decode import is_unrolled, nucleus
from ziya_jax.model import ZiyaVisual, default_positions
from ziya_jax.model.llama import init_cache


class QueueFull(RuntimeError):
    """More requests are waiting than the engine queues."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int | None  # None: what the context leaves, up to the server's cap (Service.request)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request hears: one new token, or (token None) the end and why: "stop" (EOS), "length"
    (max_tokens) or "cancelled"."""

    token: int | None = None
    finish: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt as formats.prompt_input builds it, with its images (normalised [H, W, 3] each)."""

    input_ids: np.ndarray  # [T]
    images: list[np.ndarray]
    sampling: Sampling
    deliver: Callable[[Event], None]  # called on the engine's thread: must not block
    qformer_ids: np.ndarray | None = None  # [L] (Chat)
    qformer_mask: np.ndarray | None = None
    cancelled: bool = False
    generated: int = 0
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


def buckets(context: int) -> tuple[int, ...]:
    """Prompt lengths that compile: powers of two from 64 below the context, and the context."""
    sizes, size = [], 64
    while size < context:
        sizes.append(size)
        size *= 2
    return (*sizes, context)


class Metrics:
    """The engine's Prometheus metrics, on a registry of their own (one per engine)."""

    def __init__(self):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.queue = prom.Gauge("ziya_queue_length", "requests waiting for a slot", registry=r)
        self.live = prom.Gauge("ziya_live_slots", "slots decoding a request", registry=r)
        self.tokens = prom.Counter("ziya_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_s = prom.Gauge(
            "ziya_tokens_per_second", "tokens generated per second over the last 10 s", registry=r
        )
        self.ttft = prom.Histogram(
            "ziya_time_to_first_token_seconds",
            "from submission to the first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.per_token = prom.Histogram(
            "ziya_time_per_output_token_seconds",
            "between two tokens of a request",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.finished = prom.Counter("ziya_requests_finished", "requests ended, by reason", ["reason"], registry=r)
        self._recent = collections.deque()  # (time, tokens) of the last 10 s

    def count_tokens(self, n: int):
        now = time.perf_counter()
        self.tokens.inc(n)
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        self.tokens_per_s.set(sum(k for _, k in self._recent) / 10)


class Engine:
    """Continuous batching over `slots` rows (see the module docstring). params: as cli.load gives them."""

    def __init__(
        self,
        params,
        cfg: ModelConfig,
        *,
        eos_token_id: int,
        pad_token_id: int,
        decodable: int,
        slots: int = 16,
        max_images: int = 4,
        max_queue: int = 64,
    ):
        self.params, self.cfg, self.slots = params, cfg, slots
        self.eos, self.pad, self.max_images, self.max_queue = eos_token_id, pad_token_id, max_images, max_queue
        self.context = cfg.llm.max_position_embeddings
        self.decodable = decodable  # ids the tokenizer can decode: [0, decodable)
        self.buckets = buckets(self.context)
        self.metrics = Metrics()
        self._unrolled = is_unrolled(params)
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Request | None] = [None] * slots
        self._last_token_at = [0.0] * slots
        self._settings = {
            "temperature": np.zeros(slots, np.float32),
            "top_p": np.ones(slots, np.float32),
            "seed": np.zeros(slots, np.uint32),
        }
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._state = None

    # -- any thread ---------------------------------------------------------------------------------------------
    def submit(self, request: Request):
        """Queue a request (QueueFull when max_queue are already waiting). Its events arrive through deliver."""
        if len(request.images) > self.max_images:
            raise ValueError(f"{len(request.images)} images; at most {self.max_images} per request")
        if len(request.input_ids) + request.sampling.max_tokens > self.context:
            raise ValueError(
                f"prompt ({len(request.input_ids)} tokens) + max_tokens ({request.sampling.max_tokens}) exceeds "
                f"the model's context of {self.context}"
            )
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self.metrics.queue.set(len(self._waiting))
            self._wake.notify()

    def cancel(self, request: Request):
        """Stop a request (a client gone, a stop string seen): its slot is freed before the next step."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def start(self):
        self._running = True
        self._thread = threading.Thread(target=self._run, name="ziya-engine", daemon=True)
        self._thread.start()

    def stop(self):
        """Finish what is running and queued, then stop the engine's thread."""
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def live(self) -> int:
        return sum(r is not None for r in self._rows)

    # -- the engine's thread --------------------------------------------------------------------------------------
    def _run(self):
        self._state = _empty_state(self.cfg, self.slots, self._unrolled, self.pad)
        while True:
            with self._wake:
                while self._running and not self._waiting and not self.live():
                    self._wake.wait()
                if not self._running and not self._waiting and not self.live():
                    return
            self._free_cancelled()
            self._admit()
            if self.live():
                self._step()

    def _free_cancelled(self):
        for slot, request in enumerate(self._rows):
            if request is not None and request.cancelled:
                self._finish(slot, "cancelled")

    def _admit(self):
        while None in self._rows:
            with self._wake:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
                self.metrics.queue.set(len(self._waiting))
            if request.cancelled:
                self.metrics.finished.labels("cancelled").inc()
                request.deliver(Event(finish="cancelled"))
                continue
            slot = self._rows.index(None)
            self._rows[slot] = request
            self.metrics.live.set(self.live())
            for name, value in dataclasses.asdict(request.sampling).items():
                if name in self._settings:
                    self._settings[name][slot] = value
            token, self._state = self._prefill(slot, request)
            self.metrics.ttft.observe(time.perf_counter() - request.submitted)
            self._take(slot, int(token))

    def _prefill(self, slot: int, request: Request):
        cfg, length = self.cfg, len(request.input_ids)
        bucket = next(b for b in self.buckets if b >= length)
        ids = np.full((1, bucket), self.pad, np.int32)
        ids[0, :length] = request.input_ids
        features = np.zeros((1, self.max_images * cfg.num_query_tokens, cfg.llm.width), jnp.dtype(cfg.dtype))
        features = jnp.asarray(features)
        q = None
        if cfg.variant == "chat":
            q = (jnp.asarray(request.qformer_ids)[None], jnp.asarray(request.qformer_mask)[None])
        for k, image in enumerate(request.images):
            encoded = _encode_image(
                self.params, jnp.asarray(image)[None, None], *(q or (None, None)), cfg=cfg, unrolled=self._unrolled
            )
            features = jax.lax.dynamic_update_slice_in_dim(features, encoded, k * cfg.num_query_tokens, 1)
        settings = {name: jnp.asarray(v[slot : slot + 1]) for name, v in self._settings.items()}
        return _prefill_into(
            self.params,
            self._state,
            slot,
            jnp.asarray(ids),
            length,
            features,
            settings,
            self.decodable,
            cfg,
            self._unrolled,
        )

    def _step(self):
        settings = {name: jnp.asarray(v) for name, v in self._settings.items()}
        self._state = _decode_step(self.params, self._state, settings, self.decodable, self.cfg, self._unrolled)
        tokens = np.asarray(self._state["tokens"])
        for slot, request in enumerate(self._rows):
            if request is not None:
                self._take(slot, int(tokens[slot]))

    def _take(self, slot: int, token: int):
        """A row's new token: delivered, or the end of its request."""
        request, now = self._rows[slot], time.perf_counter()
        if request.generated:
            self.metrics.per_token.observe(now - self._last_token_at[slot])
        self._last_token_at[slot] = now
        request.generated += 1
        self.metrics.count_tokens(1)
        if request.cancelled:
            self._finish(slot, "cancelled")
        elif token == self.eos:
            self._finish(slot, "stop")
        else:
            request.deliver(Event(token=token))
            if request.generated >= request.sampling.max_tokens:
                self._finish(slot, "length")

    def _finish(self, slot: int, reason: str):
        request, self._rows[slot] = self._rows[slot], None
        self.metrics.live.set(self.live())
        self.metrics.finished.labels(reason).inc()
        request.deliver(Event(finish=reason))


def _empty_state(cfg: ModelConfig, slots: int, unrolled: bool, pad: int) -> dict:
    context = cfg.llm.max_position_embeddings
    return {
        "cache": init_cache(cfg.llm, slots, context, jnp.dtype(cfg.dtype), unrolled=unrolled),
        "key_mask": jnp.zeros((slots, context), jnp.int32),
        "tokens": jnp.full((slots,), pad, jnp.int32),  # each row's newest token, not yet in its cache
        "index": jnp.zeros((slots,), jnp.int32),  # where that token goes (= its position)
        "steps": jnp.zeros((slots,), jnp.int32),  # tokens sampled so far (seeds the row's next draw)
    }


def _sample(logits, settings, steps, decodable):
    """One token per row [B] among the ids below `decodable` (the image placeholder and any id past the tokenizer
    would end a request in an error): argmax where temperature is 0, else a draw from the top-p filtered
    distribution, keyed by the row's seed and step (so a request's draws do not depend on its neighbours)."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < decodable, logits, -jnp.inf)
    temperature = settings["temperature"][:, None]
    scaled = nucleus(logits / jnp.maximum(temperature, 1e-6), settings["top_p"][:, None])
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(settings["seed"], steps)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temperature[:, 0] > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "unrolled"))
def _encode_image(params, pixels, qformer_ids, qformer_mask, cfg: ModelConfig, unrolled: bool):
    model = ZiyaVisual(cfg, unrolled=unrolled)
    return model.apply({"params": params}, pixels, qformer_ids, qformer_mask, method=ZiyaVisual.encode_images)


@functools.partial(jax.jit, static_argnames=("cfg", "unrolled"), donate_argnums=(1,))
def _prefill_into(params, state, slot, ids, length, features, settings, decodable, cfg: ModelConfig, unrolled: bool):
    """Prefill one right-padded prompt [1, bucket] and copy its cache into row `slot`. -> (first token, state)."""
    model = ZiyaVisual(cfg, unrolled=unrolled)
    bucket = ids.shape[1]
    mask = (jnp.arange(bucket) < length).astype(jnp.int32)[None]
    embeds = model.apply({"params": params}, ids, features, method=ZiyaVisual.embed_inputs)
    cache = init_cache(cfg.llm, 1, bucket, embeds.dtype, unrolled=unrolled)
    logits, cache = model.apply(
        {"params": params},
        embeds,
        default_positions(mask),
        mask,
        cache,
        0,
        logits_at=jnp.reshape(length - 1, (1,)),
        method=ZiyaVisual.language,
    )
    batch_axis = 0 if unrolled else 1  # [(layers,) B, kv_heads, S, head_dim]

    def insert(big, small):
        start = [0] * big.ndim
        start[batch_axis] = slot
        return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), start)

    token = _sample(logits[:, 0], settings, jnp.zeros((1,), jnp.int32), decodable)[0]
    row_mask = jnp.zeros((1, state["key_mask"].shape[1]), jnp.int32).at[:, :bucket].set(mask)
    return token, {
        "cache": jax.tree_util.tree_map(insert, state["cache"], cache),
        "key_mask": jax.lax.dynamic_update_slice(state["key_mask"], row_mask, (slot, 0)),
        "tokens": state["tokens"].at[slot].set(token),
        "index": state["index"].at[slot].set(length),
        "steps": state["steps"].at[slot].set(1),
    }


@functools.partial(jax.jit, static_argnames=("cfg", "unrolled"), donate_argnums=(1,))
def _decode_step(params, state, settings, decodable, cfg: ModelConfig, unrolled: bool):
    """Every row's newest token into its cache at its own index, and the next token of every row."""
    model = ZiyaVisual(cfg, unrolled=unrolled)
    rows = jnp.arange(state["tokens"].shape[0])
    index = jnp.minimum(state["index"], state["key_mask"].shape[1] - 1)  # free rows run on harmlessly
    key_mask = state["key_mask"].at[rows, index].set(1)
    embeds = model.apply({"params": params}, state["tokens"][:, None], None, method=ZiyaVisual.embed_inputs)
    logits, cache = model.apply(
        {"params": params}, embeds, index[:, None], key_mask, state["cache"], index, method=ZiyaVisual.language
    )
    tokens = _sample(logits[:, 0], settings, state["steps"], decodable)
    return {
        "cache": cache,
        "key_mask": key_mask,
        "tokens": tokens,
        "index": state["index"] + 1,
        "steps": state["steps"] + 1,
    }
