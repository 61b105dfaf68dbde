"""Input pipeline throughput vs what the demo's train step consumes, in one run.

The pipeline (synthetic scenes rendered on the fly -> task formats -> tokens -> pixels -> static batches) is timed
with 0 and N worker processes; the train step is the demo config's (jitted, after compilation) on batches of the
same shape. Target: the pipeline delivers >= 3x what the step consumes, so it is never the bottleneck.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time

import jax
import numpy as np

from ziya_jax.config import ModelConfig, load_config
from ziya_jax.data import (
    DataConfig,
    QFormerTokenizer,
    SentencePieceTokenizer,
    Source,
    SyntheticSource,
    instruction_batches,
    train_demo_tokenizers,
)
from ziya_jax.model import init_params
from ziya_jax.train.loop import count_examples, data_config
from ziya_jax.train.optimizer import logged_lr, make_optimizer
from ziya_jax.train.step import Stage, init_state, train_step

TASKS = ("caption", "vqa", "grounding", "grounded_caption", "conversation")


def all_tasks(cfg: DataConfig, tok, qtok):
    """The instruction pipeline over all tasks of the synthetic train split."""
    source = SyntheticSource("train", 100_000, image_size=cfg.image_size)
    return iter(instruction_batches([Source(source, t) for t in TASKS], cfg, tok, qtok))


def pipeline_rate(cfg: DataConfig, tok, qtok, batches: int) -> float:
    """Examples/s of the instruction pipeline (the first batch, start-up, is not timed)."""
    it = all_tasks(cfg, tok, qtok)
    next(it)
    start, examples = time.perf_counter(), 0
    for _ in range(batches):
        examples += count_examples(next(it))
    return examples / (time.perf_counter() - start)


def train_rate(config, batch, steps: int) -> float:
    cfg = ModelConfig.from_dict(config.model.to_dict())
    stage = Stage.from_config(config.train)
    tx = make_optimizer(config.train.optimizer)
    state = init_state(init_params(cfg, jax.random.key(0)), stage, tx, jax.random.key(1))
    step = jax.jit(
        functools.partial(train_step, cfg=cfg, stage=stage, tx=tx, lr_schedule=logged_lr(config.train.optimizer))
    )
    batch = {k: v for k, v in batch.items() if k != "image_mask"}
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return steps * count_examples(batch) / (time.perf_counter() - start)


def run(args) -> dict:
    config = load_config(args.config)
    if config.stage == 1:
        raise SystemExit("bench data times the instruction stages (2 or 3); pass a stage-2/3 config")
    with tempfile.TemporaryDirectory() as tmp:
        train_demo_tokenizers(tmp)
        tok = SentencePieceTokenizer.load(f"{tmp}/llm.model")
        qtok = QFormerTokenizer.from_sentencepiece(f"{tmp}/qformer.model")
    cfg = data_config(config.data, ModelConfig.from_dict(config.model.to_dict()), stage1=False)
    rows = {}
    for workers in (0, args.workers):
        rows[f"pipeline, {workers} workers"] = pipeline_rate(
            DataConfig(**{**cfg.__dict__, "num_workers": workers}), tok, qtok, args.batches
        )
    sample = next(all_tasks(cfg, tok, qtok))
    consumed = train_rate(config, {k: np.asarray(v) for k, v in sample.items()}, args.steps)
    print(f"{'':<26}{'examples/s':>12}{'x train step':>14}")
    for name, rate in rows.items():
        print(f"{name:<26}{rate:>12.1f}{rate / consumed:>14.2f}")
    print(f"{'train step consumes':<26}{consumed:>12.1f}")
    result = {
        "pipeline_examples_s": rows,
        "train_step_examples_s": consumed,
        "ratio_best_pipeline_to_train": max(rows.values()) / consumed,
        "config": args.config,
    }
    print(json.dumps(result))
    return result
