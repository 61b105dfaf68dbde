"""python -m ziya_jax.summary --config configs/X.py[:arg]: parameter counts and sizes per model part, from
jax.eval_shape (nothing is allocated, so the 14B configs print in seconds)."""
from __future__ import annotations

import argparse

import flax.linen as nn
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ziya_jax.summary", description=__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_dict(load_config(args.config).model.to_dict())
    counts = count_params(cfg)
    bytes_per = np.dtype(cfg.param_dtype).itemsize
    print(f"{'part':<22}{'parameters':>16}{'GB (' + cfg.param_dtype + ')':>18}")
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"{name:<22}{n:>16,}{n * bytes_per / 1e9:>18.2f}")
    vision = sum(counts.get(k, 0) for k in VISION_SIDE)
    total = sum(counts.values())
    print(f"{'vision side':<22}{vision:>16,}{vision * bytes_per / 1e9:>18.2f}")
    print(f"{'total':<22}{total:>16,}{total * bytes_per / 1e9:>18.2f}")


if __name__ == "__main__":
    main()
