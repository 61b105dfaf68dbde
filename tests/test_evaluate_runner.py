"""The evaluation plumbing on a tiny random model: batched generation, the synthetic benchmark and the CLI.
A random model's scores mean nothing; these tests check shapes, keys, consistency and that everything runs."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_evaluate_datasets import DATA, make_images

from ziya_jax.checkpoint import load_model, save_model
from ziya_jax.config import ModelConfig, load_config
from ziya_jax.data import formats, synthetic
from ziya_jax.data.synthetic import train_demo_tokenizers
from ziya_jax.data.tokenizers import load_tokenizers
from ziya_jax.decode import DecodeConfig
from ziya_jax.evaluate import captioning, grounding, inference, vqa
from ziya_jax.evaluate.__main__ import main
from ziya_jax.evaluate.synthetic import evaluate_synthetic, format_table, max_new_tokens_for
from ziya_jax.model import abstract_params

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

N, BATCH = 6, 4
HEADS = ("vision_proj", "text_proj", "itm_head", "temp")


def _tiny(stage: int, tok, qtok) -> ModelConfig:
    base = ModelConfig.from_dict(load_config(f"configs/tiny.py:variant=chat,stage={stage}").model.to_dict())
    return dataclasses.replace(
        base,
        image_token_id=tok.vocab_size,
        qformer=dataclasses.replace(base.qformer, vocab_size=qtok.vocab_size),
        llm=dataclasses.replace(base.llm, vocab_size=tok.vocab_size + 1, eos_token_id=tok.eos_id),
    )


def _random_params(cfg: ModelConfig, seed: int = 0):
    """Random weights made from the parameter shapes on the host (compiling the initialiser would cost more than
    the evaluations under test). A large random LM head makes greedy answers vary with the input."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = path[-1].key
        if name == "scale":
            return np.ones(a.shape, np.float32)
        if name in ("bias", "lm_bias"):
            return np.zeros(a.shape, np.float32)
        if name == "temp":
            return np.full(a.shape, 0.07, np.float32)
        std = 1.0 if [p.key for p in path[-2:]] == ["lm_head", "kernel"] else 0.02
        return (rng.standard_normal(a.shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(abstract_params(cfg)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    train_demo_tokenizers(str(root / "tok"))
    tok, qtok = load_tokenizers(str(root / "tok"))
    cfg = _tiny(1, tok, qtok)  # stage 1: the LLM plus the ITC/ITM heads, so every task can run
    save_model(str(root / "ckpt"), _random_params(cfg), cfg)
    params, cfg = load_model(str(root / "ckpt"))  # the arrays the CLI will see, so its programs are reused
    return root, params, cfg, tok, qtok


@pytest.fixture(scope="module")
def synthetic_results(model):
    _, params, cfg, tok, qtok = model
    return evaluate_synthetic(params, cfg, tok, qtok, image_size=cfg.vision.image_size, n=N, batch_size=BATCH, show=4)


def _decode_lengths(tok, results) -> dict:
    """The synthetic run's decode lengths per decoder group, so later calls can reuse its compiled decoders."""
    return {
        k: max_new_tokens_for(
            tok, [e["reference"] for r in results.values() for e in r["predictions"] if e["task"] in tasks]
        )
        for k, tasks in (("caption", ("caption",)), ("short", ("vqa", "grounding")))
    }


def test_batched_generation_equals_one_prompt_at_a_time(model, synthetic_results):
    _, params, cfg, tok, qtok = model
    rng = np.random.default_rng(0)
    prompts = [
        inference.Prompt(q, rng.standard_normal((28, 28, 3)).astype(np.float32))
        for q in ("What is this?", "Is it red?", "请描述图片。", "Where?", "How many?")
    ]
    gen = inference.Generator(params, cfg, tok, qtok, batch_size=BATCH, bucket=32)
    assert len({len(gen.inputs(p, 0)["input_ids"]) for p in prompts}) > 1  # the batch really left-pads
    dc = DecodeConfig(max_new_tokens=_decode_lengths(tok, synthetic_results)["short"])
    batched = gen(prompts, dc)  # 2 batches, the second padded with repeated rows
    assert batched == [gen([p], dc)[0] for p in prompts]
    assert len(set(batched)) > 1


def test_decoded_text_drops_eos_and_the_image_placeholder(model):
    _, params, cfg, tok, qtok = model
    gen = inference.Generator(params, cfg, tok, qtok)
    ids = tok.encode("red circle")
    assert gen.decode([*ids, cfg.image_token_id, tok.eos_id]) == "red circle"
    assert gen.decode([cfg.image_token_id]) == ""


def test_synthetic_scores_agree_with_their_predictions(synthetic_results):
    r = synthetic_results
    assert set(r) == {"en", "zh"}
    for lang, res in r.items():
        for key in ("vqa_em", "cider", "bleu4", "grounding_acc", "retrieval_ir1", "retrieval_tr1"):
            assert 0.0 <= res[key] <= 100.0 * (10 if key == "cider" else 1), (lang, key)
        assert res["n"] == N
        by_task = {t: [e for e in res["predictions"] if e["task"] == t] for t in ("vqa", "caption", "grounding")}
        assert [e["task"] for e in res["examples"]] == ["vqa", "caption", "grounding", "vqa"]
        assert res["examples"][:2] == [by_task["vqa"][0], by_task["caption"][0]]
        assert len(res["predictions"]) == 3 * N and all(len(v) == N for v in by_task.values())
        hits = [(e["kind"], vqa.exact_match(e["prediction"], e["reference"], lang)) for e in by_task["vqa"]]
        assert res["vqa_em"] == vqa.mean(h for _, h in hits)
        kinds = {k for k, _ in hits}
        assert kinds <= set(synthetic.VQA_KINDS) and len(kinds) > 1
        assert {k for k in res if k.startswith("vqa_em_")} == {f"vqa_em_{k}" for k in kinds}
        for kind in kinds:
            assert res[f"vqa_em_{kind}"] == vqa.mean(h for k, h in hits if k == kind)
        boxes = [formats.parse_boxes(e["reference"])[0] for e in by_task["grounding"]]
        assert res["grounding_acc"] == vqa.mean(
            grounding.grounding_hit(e["prediction"], b) for e, b in zip(by_task["grounding"], boxes)
        )
        refs = {str(k): [e["reference"]] for k, e in enumerate(by_task["caption"])}
        preds = {str(k): e["prediction"] for k, e in enumerate(by_task["caption"])}
        assert res["cider"] == pytest.approx(captioning.caption_scores(refs, preds, lang)["CIDEr"])
    assert r["en"]["examples"][0]["question"] != r["zh"]["examples"][0]["question"]


def test_synthetic_table(synthetic_results):
    table = format_table(synthetic_results)
    assert "Synthetic test split (n=6 per language" in table
    for row in ("VQA exact match", "Caption CIDEr", "Grounding acc (IoU>=0.5)", "Retrieval IR@1", "Retrieval TR@1"):
        line = next(line for line in table.splitlines() if line.startswith(row))
        assert len(line.split()) == len(row.split()) + 2  # a number per language
    assert "jieba" in table and "PTB" in table
    kinds = [k[len("vqa_em_") :] for k in synthetic_results["en"] if k.startswith("vqa_em_")]
    assert kinds and all(f"\n  {kind} questions " in table for kind in kinds)


def test_synthetic_without_stage1_heads_omits_retrieval(model):
    _, params, _, tok, qtok = model
    cfg = _tiny(2, tok, qtok)
    qformer = {k: v for k, v in params["qformer"].items() if not k.startswith("lm_")}
    stage2 = {k: v for k, v in params.items() if k not in HEADS} | {"qformer": qformer}
    r = evaluate_synthetic(
        stage2, cfg, tok, qtok, image_size=28, n=2, batch_size=BATCH, langs=("zh",), tasks=("retrieval",)
    )
    assert r == {"zh": {"n": 2}}
    r = evaluate_synthetic(params, model[2], tok, None, image_size=28, n=2, langs=("zh",), tasks=("retrieval",))
    assert r == {"zh": {"n": 2}}  # heads, but no Q-Former tokenizer to read the captions
    with pytest.raises(ValueError, match="unknown synthetic tasks"):
        evaluate_synthetic(stage2, cfg, tok, qtok, image_size=28, n=2, tasks=("ocr",))


def _cli(root, *args):
    return main(
        [
            "--checkpoint",
            str(root / "ckpt"),
            "--tokenizer",
            str(root / "tok"),
            "--out",
            str(root / "out"),
            "--batch-size",
            str(BATCH),
            *args,
        ]
    )


def test_cli_synthetic_matches_the_library(model, synthetic_results, capsys):
    root = model[0]
    assert _cli(root, "--task", "synthetic", "--limit", str(N), "--show", "2") == 0
    out = capsys.readouterr().out
    assert "Synthetic test split" in out and "[zh caption]" in out
    scores = json.loads((root / "out" / "synthetic.scores.json").read_text())
    for lang in ("en", "zh"):
        want = {k: v for k, v in synthetic_results[lang].items() if k not in ("predictions", "examples")}
        assert scores[lang] == pytest.approx(want)
    rows = [json.loads(line) for line in (root / "out" / "synthetic.predictions.jsonl").read_text().splitlines()]
    assert rows == [r | {"lang": lang} for lang in ("en", "zh") for r in synthetic_results[lang]["predictions"]]


def test_cli_benchmarks_write_predictions_scores_and_the_table(model, synthetic_results, tmp_path, capsys):
    root, _, _, tok, _ = model
    images = make_images(tmp_path)
    common = ["--data", DATA, "--image-dir", images]
    lengths = {k: str(v) for k, v in _decode_lengths(tok, synthetic_results).items()}
    assert _cli(root, "--task", "flickr30k_cna", *common, "--max-new-tokens", lengths["caption"]) == 0
    assert _cli(root, "--task", "vqav2", *common, "--prompt", "{question}", "--max-new-tokens", lengths["short"]) == 0
    assert _cli(root, "--task", "scienceqa_img", *common) == 0
    assert _cli(root, "--task", "retrieval", *common, "--itm-top-k", "2") == 0
    table = capsys.readouterr().out.split("English benchmarks")[-1]
    out = root / "out"
    cna = json.loads((out / "flickr30k_cna.scores.json").read_text())
    assert cna["n"] == 3 and "jieba" in cna["tokenization"] and cna["CIDEr"] >= 0
    preds = [json.loads(line) for line in (out / "vqav2.predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["420000", "420001", "730000"]
    v2 = json.loads((out / "vqav2.scores.json").read_text())
    assert v2["accuracy"] == pytest.approx(vqa.mean(vqa.vqa_accuracy(p["prediction"], p["answers"]) for p in preds))
    assert v2["decode"] == {"num_beams": 1, "max_new_tokens": int(lengths["short"])}
    sqa = [json.loads(line) for line in (out / "scienceqa_img.predictions.jsonl").read_text().splitlines()]
    assert [len(p["logprobs"]) for p in sqa] == [4, 2]
    assert all(p["prediction"] == int(np.argmax(p["logprobs"])) and max(p["logprobs"]) < 0 for p in sqa)
    ret = json.loads((out / "retrieval_flickr30k_cna.scores.json").read_text())
    assert ret["n_images"] == 3 and ret["n_texts"] == 6 and ret["itm_top_k"] == 2
    assert {"IR@1", "TR@1", "IR@10", "TR@10"} <= set(ret) and ret["TR@10"] == ret["IR@10"] == 100.0
    for row, paper in (("NoCaps val CIDEr", "119.6"), ("VQAv2 VQA score", "75.5"), ("Flickr30k-CNA TR@1", "n/a")):
        line = next(line for line in table.splitlines() if line.startswith(row))
        assert line.split()[-1] == paper
    ours = {line.rsplit(None, 3)[0].strip(): line.split()[-3] for line in table.splitlines() if line.count(" ") > 3}
    assert ours["NoCaps val CIDEr"] == "-" and ours["VQAv2 VQA score"] == f"{v2['accuracy']:.1f}"
    assert ours["Flickr30k-CNA TR@1"] == f"{ret['TR@1']:.1f}"


def test_cli_errors_are_messages_not_tracebacks(model, tmp_path, capsys):
    root = model[0]
    assert _cli(root, "--task", "gqa") == 2
    assert "needs --data" in capsys.readouterr().err
    assert _cli(root, "--task", "gqa", "--data", str(tmp_path / "missing")) == 2
    assert "no annotation file or folder" in capsys.readouterr().err
    assert _cli(root, "--task", "nocaps", "--data", DATA, "--image-dir", str(tmp_path)) == 2
    assert "images are missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _cli(root, "--task", "coco_caption", "--data", DATA)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "no_ckpt"), "--task", "synthetic"]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "no_ckpt")
