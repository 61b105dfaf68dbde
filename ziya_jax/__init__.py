"""ziya_jax: Ziya-Visual (EVA ViT + BLIP-2 Q-Former + LLaMA with LoRA) in JAX/Flax."""

from ziya_jax.config import ModelConfig

__all__ = ["ModelConfig"]
