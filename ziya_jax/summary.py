"""python -m ziya_jax.summary --config configs/X.py[:arg] [--quantize int8]: parameter counts and sizes per model
part, from jax.eval_shape (nothing is allocated, so the 14B configs print in seconds). --quantize int8 adds the weight
bytes in bfloat16 and quantised to int8 (ziya_jax.quantize, from the bfloat16 weights)."""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ziya_jax.config import ModelConfig, load_config
from ziya_jax.model import abstract_params

VISION_SIDE = ("vision_model", "qformer", "language_projection", "query_tokens")


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter count of each top-level part ('vision_model', 'qformer', 'language_model', ...)."""
    params = nn.meta.unbox(abstract_params(cfg))
    return {name: sum(int(np.prod(x.shape)) for x in _leaves(tree)) for name, tree in params.items()}


def _leaves(tree):
    return [tree] if not isinstance(tree, dict) else [x for v in tree.values() for x in _leaves(v)]


def weight_bytes(cfg: ModelConfig, mode: str) -> dict[str, dict[str, int]]:
    """{'bfloat16': {part: bytes}, mode: {part: bytes}}: the weights cast to bfloat16, then quantised (abstract)."""
    from ziya_jax.quantize import quantize_abstract

    bf16 = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype),
        nn.meta.unbox(abstract_params(cfg)),
    )
    quantized, _ = quantize_abstract(bf16, cfg, mode)
    size = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in _leaves(tree))
    return {name: {k: size(v) for k, v in tree.items()} for name, tree in (("bfloat16", bf16), (mode, quantized))}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ziya_jax.summary", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--quantize",
        choices=("", "none", "int8"),
        default="",
        help="also print the weight bytes in bfloat16 and quantised this way",
    )
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_dict(load_config(args.config).model.to_dict())
    counts = count_params(cfg)
    bytes_per = np.dtype(cfg.param_dtype).itemsize
    mode = "" if args.quantize == "none" else args.quantize
    sizes = weight_bytes(cfg, mode) if mode else {}
    columns = [(f"GB ({cfg.param_dtype})", {k: n * bytes_per for k, n in counts.items()})]
    columns += [(f"GB ({name})", part_bytes) for name, part_bytes in sizes.items()]
    print(f"{'part':<22}{'parameters':>16}" + "".join(f"{title:>18}" for title, _ in columns))
    rows = [(name, (name,)) for name, _ in sorted(counts.items(), key=lambda kv: -kv[1])]
    rows += [("vision side", VISION_SIDE), ("total", tuple(counts))]
    for name, parts in rows:
        print(
            f"{name:<22}{sum(counts.get(k, 0) for k in parts):>16,}"
            + "".join(f"{sum(b.get(k, 0) for k in parts) / 1e9:>18.2f}" for _, b in columns)
        )
    if mode:
        total = {name: sum(b.values()) for name, b in sizes.items()}
        print(
            f"weight bytes {mode} / bfloat16: {total[mode] / total['bfloat16']:.1%} "
            f"({total[mode]:,} / {total['bfloat16']:,})"
        )


if __name__ == "__main__":
    main()
