"""The training loop: one stage (config with model/data/train/checkpoint/eval sections) or a pipeline of stages
(config.stages), each in its own folder of the workdir, each starting from the previous one's model.

A stage's folder holds checkpoints/ (Orbax: train state + data iterator, the resumable part), metrics.jsonl,
tensorboard/, and when the stage is done model/ (params + model config, what the next stage, evaluation,
chat and export read) and eval.json. Running the same command again resumes where it stopped; a finished
stage is not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from ziya_jax.checkpoint import load_model, load_model_config
from ziya_jax.config import ModelConfig
from ziya_jax.data import pipeline, synthetic
from ziya_jax.data.manifest import ManifestSource
from ziya_jax.data.tfds_builders import data_source
from ziya_jax.data.tokenizers import check_vocabularies, load_tokenizers
from ziya_jax.sharding import global_batch, init_sharded, make_mesh, param_shardings, rules_from_config
from ziya_jax.train.checkpoints import Checkpoints, abstract, save_final
from ziya_jax.train.observe import Reporter, matmul_flops, peak_flops
from ziya_jax.train.optimizer import logged_lr, make_optimizer
from ziya_jax.train.sharded import jit_train_step, qformer_text_len, state_shardings
from ziya_jax.train.step import Stage, init_state
from ziya_jax.train.vision import train_vision
from ziya_jax.tree import flatten, unflatten

log = logging.getLogger(__name__)

MODEL_DIR, EVAL_FILE = "model", "eval.json"
DEMO_TOKENIZERS = "demo"  # data.tokenizers: train the synthetic set's tokenizers into WORKDIR/tokenizers if missing


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops, the last good checkpoint stays as it is."""


class Preempted(RuntimeError):
    """SIGTERM: the state was saved; rerunning the command resumes."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses, before anything is written, settings that would train nothing or fail only later: a stage
    without a positive step count would write an untrained model that the next run takes as done; a missing
    tokenizer, start model, data set or benchmark file is named by its key and path."""
    stages = config.stages.items() if "stages" in config else [("", config)]
    for name, stage in stages:
        prefix = f"stages.{name}." if name else ""
        total = stage.train.optimizer.total_steps
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"{prefix}train.optimizer.total_steps={total!r}: a stage trains at least one step")
        if stage.get("kind") == "vision":
            continue
        directory = stage.data.tokenizers
        if not directory:
            raise ValueError(
                f"{prefix}data.tokenizers is not set: give a folder holding llm.model or tokenizer.model (the "
                "full-size configs take WEIGHTS/tokenizer from their argument init=WEIGHTS)"
            )
        if directory != DEMO_TOKENIZERS and not (isinstance(directory, str) and os.path.isdir(directory)):
            raise ValueError(
                f"{prefix}data.tokenizers={directory!r}: no such folder (give a folder holding "
                f"llm.model or tokenizer.model, or {DEMO_TOKENIZERS!r})"
            )
        init_from = stage.train.init_from
        if init_from and not os.path.isdir(os.path.join(init_from, "model_config")):
            raise ValueError(
                f"{prefix}train.init_from={init_from!r}: no model there (give a `python -m ziya_jax.convert "
                "from-hf` output or a stage's model/ folder)"
            )
        for i, source in enumerate(stage.data.sources):
            for key, path in source_paths(stage.data, source).items():
                if not os.path.exists(path):
                    raise ValueError(
                        f"{prefix}data.sources[{i}] ({source.get('name', source.get('kind'))}): no {key} at {path}"
                    )
        for i, bench in enumerate(stage.eval.get("benchmarks", ())):
            path = os.path.join(stage.data.get("data_dir", ""), bench["data"])
            if not os.path.exists(path):
                raise ValueError(f"{prefix}eval.benchmarks[{i}] ({bench['task']}): no data at {path}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the config's stage, or each of config.stages in the order of their names (ml_collections sorts
    them) -> {stage name: eval results}."""
    check_config(config)
    if "stages" not in config:
        return {"stage": run_stage(config, workdir, workdir)}
    results, previous = {}, ""
    for name, stage_config in config.stages.items():
        if previous and not stage_config.train.init_from:
            stage_config = ml_collections.ConfigDict(stage_config.to_dict())
            stage_config.train.init_from = os.path.join(previous, MODEL_DIR)
        previous = os.path.join(workdir, name)
        results[name] = run_stage(stage_config, previous, workdir)
    return results


def tokenizer_dir(data: ml_collections.ConfigDict, root: str) -> str:
    """The folder of data.tokenizers; "demo" trains the synthetic set's tokenizers into ROOT/tokenizers once."""
    directory = data.tokenizers
    if directory == DEMO_TOKENIZERS:
        directory = os.path.join(root, "tokenizers")
        if not os.path.isfile(os.path.join(directory, "qformer.model")):
            synthetic.train_demo_tokenizers(directory)
    return directory


def source_paths(data: ml_collections.ConfigDict, source) -> dict[str, str]:
    """The files a manifest source reads: its manifest (`path`, default NAME/train.jsonl) and image folder
    (`images`, default the manifest's folder), both under data.data_dir."""
    if source.get("kind") != "manifest":
        return {}
    root = data.get("data_dir", "")
    manifest = os.path.join(root, source.get("path", os.path.join(source.get("name", ""), "train.jsonl")))
    images = os.path.join(root, source["images"]) if source.get("images") else os.path.dirname(manifest)
    return {"manifest": manifest, "image folder": images}


def sources(data: ml_collections.ConfigDict, image_size: int) -> list[pipeline.Source]:
    """data.sources: {kind: synthetic, split, n[, seed]} (rendered on the fly), {kind: tfds, name, split,
    data_dir} or {kind: manifest, name[, path, images]} (see `source_paths`), each with a task and a mixture
    weight: a number, or "size" for the source's number of records (sampling the union uniformly)."""
    out = []
    for i, s in enumerate(data.sources):
        s = ml_collections.ConfigDict(s)
        if s.kind == "synthetic":
            records = synthetic.SyntheticSource(s.split, s.n, image_size, s.get("seed", 0))
        elif s.kind == "tfds":
            records = data_source(s.name, s.split, s.data_dir)
        elif s.kind == "manifest":
            paths = source_paths(data, s)
            records = ManifestSource(paths["manifest"], paths["image folder"])
        else:
            raise ValueError(f"data.sources[{i}].kind={s.kind!r}: use 'synthetic', 'tfds' or 'manifest'")
        weight = s.get("weight", 1.0)
        out.append(
            pipeline.Source(
                records,
                s.get("task", pipeline.AUTO),
                float(len(records)) if weight == "size" else weight,
                f"{s.kind}:{s.get('name', '')}{s.get('split', '')}/{s.get('task', pipeline.AUTO)}",
            )
        )
    return out


def data_config(data: ml_collections.ConfigDict, cfg: ModelConfig, stage1: bool) -> pipeline.DataConfig:
    """This process's pipeline settings: a config's `data` for `cfg`'s model, data.batch_size / process_count
    rows a batch."""
    fields = {f.name for f in dataclasses.fields(pipeline.DataConfig)}
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.to_dict().items() if k in fields}
    options["qformer_text_len"] = qformer_text_len(data, cfg, stage1)
    if options["batch_size"] % jax.process_count():
        raise ValueError(
            f"data.batch_size={options['batch_size']} (global) does not divide among {jax.process_count()} processes"
        )
    options["batch_size"] //= jax.process_count()
    return pipeline.DataConfig(
        num_query_tokens=cfg.num_query_tokens,
        image_token_id=cfg.image_token_id,
        image_size=cfg.vision.image_size,
        **options,
    )


def batches(data: ml_collections.ConfigDict, cfg: ModelConfig, stage1: bool, tok, qtok):
    """This process's Grain iterator (its disjoint share of the sources): image-caption pairs for stage 1,
    instruction rows otherwise."""
    dcfg = data_config(data, cfg, stage1)
    srcs = sources(data, dcfg.image_size)
    if stage1:
        return iter(pipeline.pair_batches(srcs, dcfg, qtok))
    return iter(pipeline.instruction_batches(srcs, dcfg, tok, qtok))


def initial_params(cfg: ModelConfig, init_from: str, mesh, rules, seed: int):
    """Fresh parameters, overwritten by those of the `init_from` model that this model also has (same path
    and shape). What only this stage has (LoRA, stage-1 heads) stays freshly initialised; what only the
    previous stage had is dropped. Both lists are logged."""
    params = init_sharded(cfg, jax.random.key(seed), mesh, rules)
    if not init_from:
        return params
    loaded, _ = load_model(init_from, param_shardings(load_model_config(init_from), mesh, rules))
    new, old = flatten(params), flatten(loaded)
    mismatched = [p for p in new if p in old and old[p].shape != new[p].shape]
    if mismatched:
        raise ValueError(f"{init_from}: shapes differ from this stage's model for {['/'.join(p) for p in mismatched]}")
    fresh = sorted("/".join(p) for p in new if p not in old)
    dropped = sorted("/".join(p) for p in old if p not in new)
    log.info(
        "init_from %s: %d tensors loaded; fresh: %s; not used: %s",
        init_from,
        len(new) - len(fresh),
        fresh or "none",
        dropped or "none",
    )
    return unflatten({p: old.get(p, v) for p, v in new.items()})


def _host_metrics(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def count_examples(batch: dict) -> int:
    """Rows, or in packed rows the examples (segments) they hold."""
    if "segment_ids" in batch:
        return int(np.sum(np.max(batch["segment_ids"], axis=1)))
    return len(next(iter(batch.values())))


def _count_tokens(batch: dict) -> int:
    return int(np.sum(batch["attention_mask"] if "attention_mask" in batch else batch["text_mask"]))


def run_stage(config: ml_collections.ConfigDict, workdir: str, root: str) -> dict:
    """Trains one stage into `workdir` (resuming from its checkpoints) -> the stage's eval results."""
    final = os.path.join(workdir, MODEL_DIR)
    if os.path.isdir(final):
        print(f"{workdir}: already trained ({final} exists)")
        return _read_eval(workdir)
    if config.get("kind") == "vision":  # the demo's vision pretraining
        return train_vision(config, workdir, final)
    cfg = ModelConfig.from_dict(config.model.to_dict())
    train = config.train
    tokenizer_folder = tokenizer_dir(config.data, root)
    tok, qtok = load_tokenizers(tokenizer_folder)
    check_vocabularies(tok, qtok, cfg)
    stage1 = set(train.losses) <= {"itc", "itm", "itg"}
    train_dict = train.to_dict()
    if stage1 and "itg" in train.losses:
        if qtok is None:
            raise ValueError("stage-1 training needs a Q-Former tokenizer (for [DEC] and the captions)")
        train_dict["dec_token_id"] = qtok.dec_id
    stage = Stage.from_config(ml_collections.ConfigDict(train_dict))
    tx, lr_at = make_optimizer(train.optimizer), logged_lr(train.optimizer)
    mesh = make_mesh(config.mesh)
    rules = rules_from_config(config)
    data_iter = batches(config.data, cfg, stage1, tok, qtok)
    # total_steps counts optimizer updates; with gradient accumulation each takes grad_accum_steps batches, and the
    # loop's steps (logs, checkpoints, evaluation) count batches.
    total = train.optimizer.total_steps * train.optimizer.get("grad_accum_steps", 1)
    ckpt = config.checkpoint
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), ckpt.save_every, ckpt.keep, ckpt.async_save)

    params = initial_params(cfg, train.init_from, mesh, rules, train.seed)
    shardings = state_shardings(cfg, stage, tx, mesh, rules)
    step_fn = jit_train_step(cfg, stage, tx, lr_at, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda p, r: init_state(p, stage, tx, r), out_shardings=shardings)(
            params, jax.random.key(train.seed + 1)
        )
        del params
        restored = checkpoints.restore_latest(abstract(state), data_iter)
        start = 0
        if restored is not None:
            state, start = restored
            if start > total:  # its model would not be the one this config trains
                checkpoints.close()
                raise ValueError(
                    f"{workdir}: the checkpoint of step {start} is past this config's {total} steps "
                    f"(train.optimizer.total_steps={train.optimizer.total_steps} x grad_accum_steps="
                    f"{train.optimizer.get('grad_accum_steps', 1)}); raise total_steps, or train in a new workdir"
                )
            print(f"{workdir}: resuming from the checkpoint of step {start}")
        reporter = Reporter(workdir, total, start, config.log_every, f"stage {config.stage}")
        stop = _SigtermFlag()
        compiled, peak, flops = None, 0.0, 0.0
        pending, last_read = None, 0.0  # the dispatched step whose metrics are not read yet; when we last read

        def finish(step: int, metrics, host_batch, skipped: float) -> None:
            """Read a step's metrics (waiting for it), stop on a non-finite loss, report them. The step's time is
            from the previous read: with the next step already queued, that is the rate the loop trains at."""
            nonlocal last_read
            metrics = _host_metrics(metrics)
            now = time.perf_counter()
            seconds, last_read = now - last_read, now
            if not all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm")):
                checkpoints.wait()
                raise TrainingDiverged(
                    f"step {step}: loss {metrics['loss']}, grad norm {metrics['grad_norm']}; stopping. The last "
                    f"good checkpoint (step {checkpoints.manager.latest_step()}) in {workdir} is untouched: "
                    "lower the learning rate or check the data, then rerun to resume from it"
                )
            metrics.update(
                examples_per_s=count_examples(host_batch) * jax.process_count() / seconds,
                tokens_per_s=_count_tokens(host_batch) * jax.process_count() / seconds,
                mfu=flops / seconds / peak if peak else 0.0,
                skipped=skipped,
            )
            reporter.step(step, metrics)

        try:
            for step in range(start + 1, total + 1):
                host_batch = next(data_iter)
                skipped = float(sum(data_iter.skipped.values()))  # by the data layer, up to this batch
                batch = global_batch(host_batch, mesh, rules)
                if compiled is None:
                    traced = step_fn.trace(state, batch)
                    compiled, flops = traced.lower().compile(), matmul_flops(traced.jaxpr.jaxpr)
                    peak = peak_flops()[0] * jax.device_count()
                    last_read = time.perf_counter()
                state, metrics = compiled(state, batch)
                # The previous step's metrics are read only now, with this step queued behind it, so the device
                # does not wait while the host prepares the next batch and logs.
                if pending:
                    finish(*pending)
                pending = (step, metrics, host_batch, skipped)
                stopping = stop.raised  # read once: SIGTERM may arrive at any moment
                save = stopping or step == total or checkpoints.due(step)
                evaluate_now = config.eval.every and step % config.eval.every == 0 and step < total
                if save or evaluate_now:  # only a step whose loss was read finite is saved
                    finish(*pending)
                    pending = None
                if save:
                    checkpoints.save(step, state, data_iter, force=True)
                if stopping:
                    checkpoints.wait()
                    raise Preempted(f"SIGTERM at step {step}: saved; rerun the same command to resume")
                if evaluate_now:
                    scores = _flat_scores(evaluate(config, state.params(), cfg, tok, qtok))
                    reporter.scalars(step, "eval", scores)
                    reporter.write(
                        f"eval at step {step}: "
                        + " ".join(f"{k}={v:.1f}" for k, v in scores.items() if not k.endswith("/n"))
                    )
            checkpoints.wait()
        finally:
            stop.restore()
            reporter.close()
            checkpoints.close()
        if data_iter.skipped:
            print(f"{workdir}: skipped samples by reason: {dict(data_iter.skipped)}")
        params = state.params()
        save_final(final, params, cfg, tokenizer_folder)
        results = evaluate(config, params, cfg, tok, qtok, show=config.eval.show)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, EVAL_FILE), "w", encoding="utf-8") as f:
                json.dump(results, f, ensure_ascii=False, indent=1)
    return results


def evaluate(config, params, cfg: ModelConfig, tok, qtok, show: int = 0) -> dict:
    """The stage's evaluation hook -> {language: synthetic scores} for config.eval.tasks (the synthetic test
    split) and {"benchmarks": {task: scores}} for config.eval.benchmarks (released evaluation files under
    data.data_dir, each {task, data[, images, split, limit, lang]} as `python -m ziya_jax.evaluate` reads them)."""
    results = {}
    if config.eval.tasks:
        from ziya_jax.evaluate.synthetic import evaluate_synthetic

        results = evaluate_synthetic(
            params,
            cfg,
            tok,
            qtok,
            image_size=cfg.vision.image_size,
            n=config.eval.n,
            batch_size=config.eval.batch_size,
            tasks=tuple(config.eval.tasks),
            show=show,
        )
    benchmarks = config.eval.get("benchmarks", ())
    if benchmarks:
        from ziya_jax.evaluate.tasks import Settings, load_items, output_name, run_task

        settings = Settings(batch_size=config.eval.batch_size)
        results["benchmarks"] = {}
        for bench in benchmarks:
            root = config.data.get("data_dir", "")
            images = os.path.join(root, bench["images"]) if bench.get("images") else None
            items = load_items(
                bench["task"], os.path.join(root, bench["data"]), images, bench.get("split"), bench.get("limit")
            )
            lang_settings = dataclasses.replace(settings, lang=bench.get("lang"))
            _, scores = run_task(bench["task"], items, params, cfg, tok, qtok, lang_settings)
            name = output_name(bench["task"], lang_settings.lang or "", os.path.basename(bench["data"]))
            results["benchmarks"][name] = scores
    return results


def _flat_scores(results: dict) -> dict[str, float]:
    return {
        f"{group}/{k}": v
        for group, scores in [*results.items(), *results.get("benchmarks", {}).items()]
        if isinstance(scores, dict) and group != "benchmarks"
        for k, v in scores.items()
        if isinstance(v, (int, float))
    }


def _read_eval(workdir: str) -> dict:
    path = os.path.join(workdir, EVAL_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _SigtermFlag:
    """Turns SIGTERM (a preemption notice) into a flag the loop checks after each step."""

    def __init__(self):
        self.raised = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)
