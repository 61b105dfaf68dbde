"""The generate and chat CLIs on a tiny Chat model with the demo tokenizers."""
import dataclasses
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from ziya_jax.chat import ChatSession, load_tokenizers
from ziya_jax.chat import main as chat_main
from ziya_jax.checkpoint import save_model
from ziya_jax.config import ModelConfig, load_config
from ziya_jax.data import formats
from ziya_jax.data.images import open_rgb, to_pixels
from ziya_jax.data.synthetic import train_demo_tokenizers
from ziya_jax.decode import DecodeConfig, generate
from ziya_jax.generate import main as generate_main
from ziya_jax.model import init_params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train_demo_tokenizers(str(root / "tok"))
    tok, qtok = load_tokenizers(str(root / "tok"))
    base = ModelConfig.from_dict(load_config("configs/tiny.py:variant=chat,stage=2").model.to_dict())
    cfg = dataclasses.replace(
        base, image_token_id=tok.vocab_size, qformer=dataclasses.replace(base.qformer, vocab_size=qtok.vocab_size),
        llm=dataclasses.replace(base.llm, vocab_size=tok.vocab_size + 1, eos_token_id=tok.eos_id))
    params = init_params(cfg, jax.random.key(0))
    # Large random LM head so greedy answers vary with the input instead of collapsing to one token.
    params["language_model"]["lm_head"]["kernel"] = params["language_model"]["lm_head"]["kernel"] * 50
    save_model(str(root / "ckpt"), params, cfg)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / "img.png")
    return root, params, cfg, tok, qtok


def test_generate_prompt_matches_library(setup, capsys):
    root, params, cfg, tok, qtok = setup
    argv = ["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--image", str(root / "img.png"),
            "--prompt", "What colour is the circle?", "--max-new-tokens", "6", "--json"]
    assert generate_main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    pixels = to_pixels(open_rgb(str(root / "img.png")), cfg.vision.image_size)
    ids = formats.encode_prompt([], formats.IMAGE + "What colour is the circle?", tok, cfg.image_token_id,
                                cfg.num_query_tokens)
    q = formats.encode_qformer_text("What colour is the circle?", qtok, 128)
    dc = DecodeConfig(max_new_tokens=6, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tokens, lengths = generate(params, cfg, np.asarray([ids]), None, pixels[None, None], q["ids"][None],
                               q["mask"][None], dc=dc)
    assert out["token_ids"] == [int(t) for t in tokens[0, :lengths[0]]]
    assert out["answer"] == tok.decode([t for t in out["token_ids"] if t != tok.eos_id])


def test_generate_raw_ids_and_npy_pixels(setup, capsys, tmp_path):
    root, params, cfg, tok, qtok = setup
    pixels = np.random.default_rng(1).normal(size=(3, 28, 28)).astype(np.float32)  # HF layout
    np.save(tmp_path / "px.npy", pixels)
    argv = ["--checkpoint", str(root / "ckpt"), "--image", str(tmp_path / "px.npy"), "--input-ids", "5,6,7",
            "--qformer-input-ids", "4,9", "--max-new-tokens", "5", "--num-beams", "2", "--json"]
    assert generate_main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip())["token_ids"]
    ids = np.asarray([[cfg.image_token_id] * cfg.num_query_tokens + [5, 6, 7]])
    dc = DecodeConfig(max_new_tokens=5, num_beams=2, eos_token_id=cfg.llm.eos_token_id,
                      pad_token_id=cfg.llm.pad_token_id)
    tokens, lengths = generate(params, cfg, ids, None, pixels.transpose(1, 2, 0)[None, None],
                               np.asarray([[4, 9]]), np.ones((1, 2), np.int32), dc=dc)
    assert got == [int(t) for t in tokens[0, :lengths[0]]]


@pytest.mark.parametrize("extra,message", [
    (["--image", "/nonexistent.png", "--prompt", "hi"], "cannot read image"),
    (["--prompt", "hi", "--max-new-tokens", "100000"], "exceeds the model's context"),
    (["--input-ids", "1,x"], "comma-separated integers"),
])
def test_generate_bad_input_is_a_message(setup, capsys, extra, message):
    root = setup[0]
    assert generate_main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_chat_streams_multi_turn_multi_image(setup):
    root, params, cfg, tok, qtok = setup
    script = (f"/image {root / 'img.png'}\nWhat is this?\n/image {root / 'img.png'}\n这两张图有什么不同？\n"
              "/image /missing.png\n/reset\nHello\n/quit\nnever read\n")
    out = io.StringIO()
    argv = ["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--greedy",
            "--max-new-tokens", "5"]
    assert chat_main(argv, stdin=io.StringIO(script), stdout=out) == 0
    lines = out.getvalue().splitlines()

    session = ChatSession(params, cfg, tok, qtok, DecodeConfig(max_new_tokens=5))
    session.add_image(str(root / "img.png"))
    a1 = session.ask("What is this?")
    session.add_image(str(root / "img.png"))
    a2 = session.ask("这两张图有什么不同？")
    # The second image entered at the second turn: the prompt holds two placeholder runs in two places.
    assert session.history[1].query.startswith(formats.IMAGE)
    session.reset()
    a3 = session.ask("Hello")
    assert lines[1:] == ["(image 1 added)", a1, "(image 2 added)", a2,
                         "error: cannot read image /missing.png: missing_file: /missing.png", "(conversation cleared)",
                         a3]
    assert len({a1, a2, a3}) > 1
