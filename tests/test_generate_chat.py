"""generate and chat, run as a user runs them, against an independent reference; chat's input against the
data pipeline's for the same conversation, on conftest's tiny_chat model."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clis import cli

from ziya_jax.chat import ChatSession
from ziya_jax.data import formats, pipeline
from ziya_jax.data.images import load_image
from ziya_jax.decode import DecodeConfig
from ziya_jax.evaluate.inference import Generator, Prompt
from ziya_jax.model import ZiyaVisual

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

QUESTION = "What colour is the circle?"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def setup(tiny_chat):
    return tiny_chat


def reference_greedy(params, cfg, tok, qtok, pixels, question, steps):
    """Greedy answer by full forward passes (no KV cache) on a prompt and instruction written out by hand:
    the image's queries, then `<human>:{question}\\n<bot>:`; the instruction `[CLS] question [SEP]`.
    -> (token ids, whether every logit was finite)."""
    ids = [cfg.image_token_id] * cfg.num_query_tokens + tok.encode(f"<human>:{question}\n<bot>:")
    body = qtok.encode(question)[-(cfg.instruction_len - 2) :]
    q = np.asarray([[qtok.cls_id, *body, qtok.sep_id]], np.int32)
    forward = jax.jit(
        lambda p, i: ZiyaVisual(cfg).apply({"params": p}, i, jnp.ones_like(i), pixels[None, None], q, jnp.ones_like(q))
    )
    out, finite = [], True
    for _ in range(steps):
        logits = forward(params, jnp.asarray([ids + out], jnp.int32))
        finite &= bool(jnp.isfinite(logits).all())
        out.append(int(jnp.argmax(logits[0, -1])))
        if out[-1] == tok.eos_id:
            break
    return out, finite


def test_generate_chat_and_evaluation_answer_as_the_reference(setup):
    root, params, cfg, tok, qtok = setup
    pixels = load_image(str(root / "img.png"), cfg.vision.image_size)
    want, finite = reference_greedy(params, cfg, tok, qtok, pixels, QUESTION, NEW_TOKENS)
    assert finite
    answer = tok.decode([t for t in want if t != tok.eos_id])
    assert answer.strip(), "the untrained model's answer should not be empty for this check to mean anything"

    gen = cli(
        "generate",
        "--checkpoint",
        str(root / "ckpt"),
        "--image",
        str(root / "img.png"),
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--json",
    )
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout.strip().splitlines()[-1])["token_ids"] == want

    chat = cli(
        "chat",
        "--checkpoint",
        str(root / "ckpt"),
        "--greedy",
        "--repetition-penalty",
        "1",
        "--max-new-tokens",
        str(NEW_TOKENS),
        stdin=f"/image {root / 'img.png'}\n{QUESTION}\n",
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.splitlines()[1:] == ["(image 1 added)", answer]

    evaluated = Generator(params, cfg, tok, qtok, batch_size=2)(
        [Prompt(QUESTION, pixels)], DecodeConfig(max_new_tokens=NEW_TOKENS)
    )
    assert evaluated == [answer.strip()]


def pipeline_row(turns, image_paths, cfg, tok, qtok):
    """The data pipeline's row for a LLaVA-format record of these turns (unpadded, one row)."""
    messages = [m for t in turns for m in ({"from": "human", "value": t.query}, {"from": "gpt", "value": t.answer})]
    record = {"id": "c", "images": image_paths, "annotation": {"conversations": messages}}
    dcfg = pipeline.DataConfig(
        batch_size=1,
        text_len=cfg.llm.max_position_embeddings,
        max_images=len(image_paths),
        image_size=cfg.vision.image_size,
        num_query_tokens=cfg.num_query_tokens,
        image_token_id=cfg.image_token_id,
        qformer_text_len=cfg.instruction_len,
        shuffle=False,
        num_epochs=1,
        strict=True,
    )
    (batch,) = list(pipeline.instruction_batches([pipeline.Source([record], "conversation")], dcfg, tok, qtok))
    return {k: v[0] for k, v in batch.items()}


def test_chat_turn_by_turn_gives_the_model_the_pipeline_input(setup):
    root, params, cfg, tok, qtok = setup
    session = ChatSession(params, cfg, tok, qtok, DecodeConfig(max_new_tokens=4, min_new_tokens=2))
    images = [str(root / "img.png"), str(root / "img2.png")]
    script = [(images[0], "What is in the picture?"), (None, "这是什么颜色？"), (images[1], "And in this one?")]
    given = []
    for image, question in script:
        if image:
            session.add_image(image)
            given.append(image)
        arrays, pixels, dropped = session.model_input(question)
        answer = session.ask(question)
        assert dropped == 0 and answer.text.strip()
        row = pipeline_row(session.turns, given, cfg, tok, qtok)
        n = len(arrays["input_ids"])
        prompt_end = np.flatnonzero(row["loss_mask"])[-len(tok.encode(answer.text)) - 1]  # the last answer starts
        np.testing.assert_array_equal(arrays["input_ids"], row["input_ids"][:prompt_end])
        assert n == prompt_end
        np.testing.assert_array_equal(arrays["qformer_ids"], row["qformer_ids"])
        np.testing.assert_array_equal(arrays["qformer_mask"], row["qformer_mask"])
        np.testing.assert_array_equal(np.stack(pixels), row["pixel_values"][: len(pixels)])
    # The second image entered at the third question: two placeholder runs, in two places.
    assert session.turns[2].query.startswith(formats.IMAGE) and not session.turns[0].query.startswith(formats.IMAGE)


def test_a_blank_answer_is_not_kept_and_the_chat_goes_on(setup):
    root, params, cfg, tok, qtok = setup
    silent = {**params, "language_model": {**params["language_model"]}}
    kernel = np.array(params["language_model"]["lm_head"]["kernel"])
    kernel[:, tok.eos_id] = 1e3  # EOS first, always
    silent["language_model"]["lm_head"] = {"kernel": jnp.asarray(kernel)}
    session = ChatSession(silent, cfg, tok, qtok, DecodeConfig(max_new_tokens=3))
    session.add_image(str(root / "img.png"))
    assert session.ask("What is this?").text == "" and session.ask("And now?").text == ""
    assert session.turns == [] and len(session.pending) == 1


def test_a_long_chat_drops_its_oldest_turns_and_says_so(setup):
    root, params, cfg, tok, qtok = setup
    question = "Describe every object in the picture in as much detail as you can, please. " * 2
    lines = [f"/image {root / 'img.png'}"] + [question] * 8
    chat = cli(
        "chat",
        "--checkpoint",
        str(root / "ckpt"),
        "--greedy",
        "--max-new-tokens",
        "24",
        "--min-new-tokens",
        "24",
        stdin="\n".join(lines) + "\n",
    )
    assert chat.returncode == 0, chat.stderr
    notes = [line for line in chat.stdout.splitlines() if line.startswith("(the conversation outgrew")]
    assert notes and "1 image(s)" in notes[0] and "error" not in chat.stdout
    # Each later question still gets an answer: no error loop.
    assert len([line for line in chat.stdout.splitlines() if line and not line.startswith("(")]) >= 8


def test_chat_refuses_a_question_that_cannot_fit_and_carries_on(setup):
    root = setup[0]
    huge = "word " * 400
    chat = cli(
        "chat",
        "--checkpoint",
        str(root / "ckpt"),
        "--greedy",
        "--max-new-tokens",
        "4",
        stdin=f"/image {root / 'img.png'}\n{huge}\nHello\n",
    )
    assert chat.returncode == 0 and "Traceback" not in chat.stderr
    out = chat.stdout.splitlines()
    assert out[2].startswith("error: the question needs") and "context is" in out[2]
    assert out[3] and not out[3].startswith("error")


def test_generate_raw_ids_and_npy_pixels(setup, tmp_path):
    root, params, cfg, tok, qtok = setup
    pixels = np.random.default_rng(1).normal(size=(3, 28, 28)).astype(np.float32)  # HF layout
    np.save(tmp_path / "px.npy", pixels)
    gen = cli(
        "generate",
        "--checkpoint",
        str(root / "ckpt"),
        "--image",
        str(tmp_path / "px.npy"),
        "--input-ids",
        "5,6,7",
        "--qformer-input-ids",
        "4,9",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert gen.returncode == 0, gen.stderr
    got = json.loads(gen.stdout.strip())["token_ids"]
    ids = [cfg.image_token_id] * cfg.num_query_tokens + [5, 6, 7]
    q = np.asarray([[4, 9]], np.int32)
    forward = jax.jit(
        lambda p, i: ZiyaVisual(cfg).apply(
            {"params": p}, i, jnp.ones_like(i), pixels.transpose(1, 2, 0)[None, None], q, jnp.ones_like(q)
        )
    )
    want = []
    for _ in range(5):
        want.append(int(jnp.argmax(forward(params, jnp.asarray([ids + want]))[0, -1])))
        if want[-1] == cfg.llm.eos_token_id:
            break
    assert got == want


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--image", "/nonexistent.png", "--prompt", "hi"], "cannot read image"),
        (["--prompt", "hi", "--max-new-tokens", "100000"], "context is"),
        (["--input-ids", "1,x"], "comma-separated integers"),
        (["--input-ids", "1,99999", "--qformer-input-ids", "1"], "token ids must be in [0, "),
        (["--input-ids=-3,1", "--qformer-input-ids", "1"], "token ids must be in [0, "),
        (["--input-ids", "1", "--qformer-input-ids", "1,99999"], "Q-Former ids must be in [0, "),
        (["--image", "NAN", "--input-ids", "1", "--qformer-input-ids", "1"], "NaN or infinite"),
        (["--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], "not valid UTF-8"),
    ],
)
def test_generate_bad_input_is_one_line(setup, tmp_path, extra, message):
    root = setup[0]
    np.save(tmp_path / "nan.npy", np.full((28, 28, 3), np.nan, np.float32))
    extra = [str(tmp_path / "nan.npy") if a == "NAN" else a for a in extra]
    done = cli("generate", "--checkpoint", root / "ckpt", *extra, text=False)
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2 and message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_chat_says_invalid_utf8_and_keeps_the_conversation(setup):
    root = setup[0]
    stdin = f"/image {root / 'img.png'}\n".encode() + b"caf\xe9?\n" + b"Hello\n"
    done = cli("chat", "--checkpoint", root / "ckpt", "--greedy", "--max-new-tokens", 3, stdin=stdin, text=False)
    out = done.stdout.decode().splitlines()
    assert done.returncode == 0 and out[1] == "(image 1 added)"
    assert out[2].startswith("error: that line is not valid UTF-8") and out[3] and not out[3].startswith("error")


def test_chat_in_process_resets(setup):
    root, params, cfg, tok, qtok = setup
    from ziya_jax.chat import main as chat_main

    out = io.StringIO()
    script = f"/image {root / 'img.png'}\nWhat is this?\n/image /missing.png\n/reset\nHello\n/quit\nnever read\n"
    argv = ["--checkpoint", str(root / "ckpt"), "--greedy", "--max-new-tokens", "5"]
    assert chat_main(argv, stdin=io.StringIO(script), stdout=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[1] == "(image 1 added)"
    assert lines[3] == "error: cannot read image /missing.png: missing_file: /missing.png"
    assert lines[4] == "(conversation cleared)" and len(lines) == 6
