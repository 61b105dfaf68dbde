"""Flax modules of Ziya-Visual."""

from ziya_jax.model.ziya import ZiyaVisual, abstract_params, default_positions, init_params

__all__ = ["ZiyaVisual", "abstract_params", "default_positions", "init_params"]
