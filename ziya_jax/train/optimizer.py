"""AdamW with warmup + cosine, weight decay with the usual exclusions, global-norm clipping and gradient
accumulation, over the trainable parameters only: frozen ones get no optimizer state at all."""

from __future__ import annotations

import ml_collections
import optax

from ziya_jax.tree import flatten, matches, unflatten

# No weight decay for biases, norm scales, embeddings of positions/classes/queries and the ITC temperature.
NO_DECAY = (
    r".*/bias",
    r".*/scale",
    r".*/(position_embedding|class_embedding)",
    r"query_tokens",
    r"temp",
    r".*/lm_bias",
)


def trainable_mask(params, patterns) -> dict:
    """A tree of bools like params: True where the parameter's path matches one of `patterns`."""
    return unflatten({path: matches(path, patterns) for path in flatten(params)})


def split(params, mask):
    """(trainable, frozen) as flat {path: leaf} dicts."""
    flat, m = flatten(params), flatten(mask)
    return ({p: v for p, v in flat.items() if m[p]}, {p: v for p, v in flat.items() if not m[p]})


def schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=opt.warmup_init_lr,
        peak_value=opt.lr,
        warmup_steps=opt.warmup_steps,
        decay_steps=max(opt.total_steps, opt.warmup_steps + 1),
        end_value=opt.end_lr,
    )


def scale_by_path(multipliers) -> optax.GradientTransformation:
    """Multiplies each update by the factor of the first (regex, factor) in `multipliers` whose regex matches the
    start of the parameter's path (1 where none does): one learning rate per parameter group, e.g. a pretrained
    module fine-tuned gently beside a fresh one."""

    def factor(path):
        return next((f for pattern, f in multipliers if matches(path, (pattern,))), 1.0)

    def update(updates, state, params=None):
        return unflatten({p: u * factor(p) for p, u in flatten(updates).items()}), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """For the nested dict of trainable parameters."""
    decay = lambda tree: unflatten({p: not matches(p, NO_DECAY) for p in flatten(tree)})
    tx = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(schedule(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay),
        *([scale_by_path(tuple(opt.lr_multipliers))] if opt.get("lr_multipliers") else []),
    )
    if opt.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum_steps)
    return tx


def logged_lr(opt: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate in force at a train step (MultiSteps advances the schedule once per accumulation)."""
    return lambda step: schedule(opt)(step // opt.grad_accum_steps)


def default_optimizer(**overrides) -> ml_collections.ConfigDict:
    """The paper's settings (AdamW lr 1e-5, betas (0.9, 0.9), eps 1e-8, weight decay 0.05, clip 2.0, 90k steps)
    with LAVIS's schedule shape (5000 warmup steps from 1e-6, then cosine). lr_multipliers: (regex, factor) pairs
    scaling the learning rate of the parameters they match (scale_by_path)."""
    cfg = ml_collections.ConfigDict(
        dict(
            lr=1e-5,
            warmup_init_lr=1e-6,
            warmup_steps=5000,
            total_steps=90000,
            end_lr=1e-6,
            b1=0.9,
            b2=0.9,
            eps=1e-8,
            weight_decay=0.05,
            grad_clip=2.0,
            grad_accum_steps=1,
            lr_multipliers=(),
        )
    )
    cfg.update(overrides)
    return cfg
