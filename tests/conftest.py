import os
import tempfile

# Multi-device code is tested on forced host devices; this must happen before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs, in process and in the CLIs they run as subprocesses (which inherit
# the environment): one persistent cache for the run compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ziya-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    """A tiny Chat model saved as the inference commands read it (ckpt/, its tokenizer in ckpt/tokenizer), and two
    images. Its Q-Former has fewer positions (24) than InstructBLIP's instruction budget (128), with an
    instruction length of its own (20): no path may read past the position table. Its LLM context is 128 tokens,
    so that a chat outgrows it. Untrained, with a large LM head so that greedy answers depend on the input.
    -> (folder, params, cfg, tok, qtok)."""
    from ziya_jax.checkpoint import save_model
    from ziya_jax.config import ModelConfig, load_config
    from ziya_jax.data.synthetic import train_demo_tokenizers
    from ziya_jax.data.tokenizers import load_tokenizers
    from ziya_jax.model import init_params

    root = tmp_path_factory.mktemp("tiny_chat")
    train_demo_tokenizers(str(root / "ckpt_tok"))
    tok, qtok = load_tokenizers(str(root / "ckpt_tok"))
    base = ModelConfig.from_dict(load_config("configs/tiny.py:variant=chat,stage=2").model.to_dict())
    cfg = dataclasses.replace(
        base,
        image_token_id=tok.vocab_size,
        instruction_len=20,
        qformer=dataclasses.replace(base.qformer, vocab_size=qtok.vocab_size, max_position_embeddings=24),
        llm=dataclasses.replace(
            base.llm, vocab_size=tok.vocab_size + 1, eos_token_id=tok.eos_id, max_position_embeddings=128
        ),
    )
    params = init_params(cfg, jax.random.key(0))
    params["language_model"]["lm_head"]["kernel"] = params["language_model"]["lm_head"]["kernel"] * 50
    save_model(str(root / "ckpt"), params, cfg)
    os.rename(root / "ckpt_tok", root / "ckpt" / "tokenizer")  # where the CLIs look by default
    rng = np.random.default_rng(0)
    for name in ("img.png", "img2.png"):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / name)
    return root, params, cfg, tok, qtok
