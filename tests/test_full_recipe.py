"""The full-size recipe (configs/ziya_chat_14b.py, configs/ziya_base_14b.py) at smoke scale, run as a user runs
it: a transformers checkpoint converted with `convert from-hf`, the released data files converted to manifests,
the three stages trained by `python -m ziya_jax.train`, and a fine-tuned model exported back to transformers."""

import base64
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hf_models import build_hf_model
from test_data_released import image_bytes, put_images, ref, refcoco_files, write_json
from test_evaluate_datasets import make_images
from transformers import (
    AutoModelForImageTextToText,
    LlamaConfig,
)

from ziya_jax.checkpoint import load_model
from ziya_jax.config import sibling
from ziya_jax.data.__main__ import main as data_cli
from ziya_jax.data.synthetic import train_demo_tokenizers
from ziya_jax.model import ZiyaVisual

pytestmark = pytest.mark.slow  # trains, converts and runs CLIs as subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"chat": "configs/ziya_chat_14b.py", "base": "configs/ziya_base_14b.py"}
SMOKE = sibling(os.path.join(ROOT, "configs", "x.py"), "common").SMOKE_MODEL
EVAL_FILES = os.path.join(ROOT, "tests", "data", "eval")
EN_CAPTIONS = ["a red cat on the table", "two men sitting at a blue table", "a green dog in the picture"]
ZH_CAPTIONS = ["一只红色的猫在桌子上", "两个男人坐在蓝色的桌子旁", "图片里有一只绿色的狗"]
VQA_EN = [("what color is the cat?", "red"), ("where is the dog?", "on the table")]
VQA_ZH = [("猫是什么颜色的?", "红色"), ("狗在哪里?", "桌子上")]
WORDS = sorted({w.strip("?") for text in EN_CAPTIONS + [t for qa in VQA_EN for t in qa] for w in text.split()})
CHINESE = "".join(ZH_CAPTIONS) + "".join(t for qa in VQA_ZH for t in qa) + "左边的男人"


def run(*args, timeout=900):
    """A CLI on one CPU device, as on a laptop (the suite's 8 forced devices only slow its compiles down)."""
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def bert_vocab(path):
    """A bert-base-uncased style vocab.txt: the special tokens, letters and their ## pieces, words, Chinese
    characters (BERT splits them one a token)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,?!'")
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *WORDS]
    pieces += sorted(set(CHINESE))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(dict.fromkeys(pieces)) + "\n")


def hf_model(variant: str):
    """A transformers InstructBLIP (Chat) or BLIP-2 (Base) + Llama with the smoke recipe's sizes."""
    v, q, llm = SMOKE["vision"], SMOKE["qformer"], SMOKE["llm"]
    vision = dict(
        hidden_size=v["width"],
        intermediate_size=v["mlp_dim"],
        num_hidden_layers=v["depth"],
        num_attention_heads=v["num_heads"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        qkv_bias=True,
        layer_norm_eps=v["layer_norm_eps"],
    )
    qformer = dict(
        hidden_size=q["width"],
        num_hidden_layers=q["depth"],
        num_attention_heads=q["num_heads"],
        intermediate_size=q["mlp_dim"],
        cross_attention_frequency=q["cross_attention_frequency"],
        encoder_hidden_size=v["width"],
        vocab_size=q["vocab_size"],
        max_position_embeddings=q["max_position_embeddings"],
    )
    text = LlamaConfig(
        hidden_size=llm["width"],
        intermediate_size=llm["mlp_dim"],
        num_hidden_layers=llm["depth"],
        num_attention_heads=llm["num_heads"],
        num_key_value_heads=llm["num_kv_heads"],
        head_dim=llm["head_dim"],
        vocab_size=llm["vocab_size"],
        max_position_embeddings=llm["max_position_embeddings"],
        rms_norm_eps=llm["rms_norm_eps"],
    )
    torch.manual_seed(0)
    kind = {"chat": "instructblip", "base": "blip2"}[variant]
    return build_hf_model(kind, vision, qformer, text, SMOKE["num_query_tokens"], SMOKE["image_token_id"], scale=0.05)


@pytest.fixture(scope="module")
def released_weights(tmp_path_factory):
    """{variant: `convert from-hf` output}: the transformers checkpoints saved as released (InstructBLIP with its
    qformer_tokenizer/vocab.txt, the LLM's tokenizer.model beside the weights), converted by the CLI."""
    root = tmp_path_factory.mktemp("weights")
    demo = train_demo_tokenizers(str(root / "demo_tokenizers"))
    os.makedirs(root / "bert-base-uncased")
    bert_vocab(root / "bert-base-uncased" / "vocab.txt")
    out = {}
    for variant in ("chat", "base"):
        hf = root / f"hf_{variant}"
        hf_model(variant).save_pretrained(hf)
        shutil.copyfile(demo[0], hf / "tokenizer.model")
        flags = []
        if variant == "chat":  # InstructBLIP ships its Q-Former's vocabulary; for BLIP-2 the user names bert's
            shutil.copytree(root / "bert-base-uncased", hf / "qformer_tokenizer")
        else:
            flags = ["--qformer-vocab", str(root / "bert-base-uncased" / "vocab.txt")]
        rc, stdout, stderr = run(
            "-m", "ziya_jax.convert", "from-hf", "--hf-dir", str(hf), "--out", str(root / variant), *flags
        )
        assert rc == 0, stderr
        assert "tokenizer: tokenizer.model" in stdout and "tokenizer: vocab.txt" in stdout, stdout
        out[variant] = str(root / variant)
    return out


def released_data(raw, data):
    """Each source of the recipe as its data set releases it (a few records, in raw/), converted the way a user
    converts it: `python -m ziya_jax.data convert` into DATA/NAME/train.jsonl, images in the source's folder."""
    coco = lambda split, i: f"{split}/COCO_{split}_{i:012d}.jpg"
    put_images(data / "coco", *(coco("train2014", i) for i in (1, 2, 3, 9)), "train2017/000000033471.jpg")
    put_images(data / "gqa", "2354786.jpg")
    put_images(data / "flickr30k", "1000092795.jpg")
    put_images(data / "ai_challenger", "8f00f3d0.jpg")
    put_images(data / "textvqa", "train_images/0054c91397f2fe05.jpg")
    put_images(data / "ocrvqa", "images/761183272.jpg")
    put_images(data / "visual_genome", "VG_100K/1.jpg")
    jobs = []  # (source name, format, inputs, images folder, split)

    def tar(name, captions):
        os.makedirs(raw / name)
        with tarfile.open(raw / name / "00000.tar", "w") as shard:
            for k, caption in enumerate(captions):
                for ext, payload in (("jpg", image_bytes()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{k:09d}.{ext}")
                    info.size = len(payload)
                    shard.addfile(info, io.BytesIO(payload))
        jobs.append((name, "img2dataset-tar", [raw / name / "00000.tar"], None, None))

    tar("pairs_en", EN_CAPTIONS)
    os.makedirs(raw / "pairs_zh")
    rows = {"key": ["000000000", "000000001"], "jpg": [image_bytes()] * 2, "txt": ZH_CAPTIONS[:2]}
    pq.write_table(pa.table({**rows, "status": ["success"] * 2}), raw / "pairs_zh" / "00000.parquet")
    jobs.append(("pairs_zh", "img2dataset-parquet", [raw / "pairs_zh" / "00000.parquet"], None, None))

    karpathy = lambda path, filename, caption: (
        {"filepath": path, "filename": filename, "split": "train"}
        | {"sentences": [{"raw": caption, "tokens": caption.split()}], "cocoid": 0}
    )
    images = [karpathy("train2014", os.path.basename(coco("train2014", i)), c) for i, c in zip((1, 2), EN_CAPTIONS)]
    write_json(raw / "dataset_coco.json", {"dataset": "coco", "images": images})
    jobs.append(("coco_caption", "karpathy", [raw / "dataset_coco.json"], "coco", None))
    flickr = [karpathy(None, "1000092795.jpg", EN_CAPTIONS[2])]
    write_json(raw / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": flickr})
    jobs.append(("flickr30k", "karpathy", [raw / "dataset_flickr30k.json"], "flickr30k", None))
    os.makedirs(raw / "coco-cn")
    (raw / "coco-cn" / "coco-cn_train.txt").write_text("COCO_train2014_000000000001\n")
    (raw / "coco-cn" / "imageid.human-written-caption.txt").write_text(
        f"COCO_train2014_000000000001#0\t{ZH_CAPTIONS[0]}\n", encoding="utf-8"
    )
    jobs.append(("coco_cn", "coco-cn", [raw / "coco-cn" / "imageid.human-written-caption.txt"], "coco", None))
    aic = [{"url": "http://x/8f00f3d0.jpg", "image_id": "8f00f3d0.jpg", "caption": ZH_CAPTIONS}]
    write_json(raw / "caption_train_annotations_20170902.json", aic)
    jobs.append(
        ("ai_challenger", "ai-challenger", [raw / "caption_train_annotations_20170902.json"], "ai_challenger", None)
    )

    for name, prefix, qa in (("vqav2", "v2_", VQA_EN), ("vqav2_t", "v2_", VQA_ZH), ("okvqa", "", VQA_EN)):
        folder = raw / name
        questions = [{"image_id": 9, "question": q, "question_id": k} for k, (q, _) in enumerate(qa)]
        write_json(
            folder / f"{prefix}OpenEnded_mscoco_train2014_questions.json",
            {"questions": questions} | {"data_subtype": "train2014"},
        )
        answers = [
            {"question_id": k, "image_id": 9, "multiple_choice_answer": a, "answers": [{"answer": a, "answer_id": 1}]}
            for k, (_, a) in enumerate(qa)
        ]
        write_json(folder / f"{prefix}mscoco_train2014_annotations.json", {"annotations": answers})
        inputs = sorted(folder.iterdir())
        jobs.append((name, name if name != "vqav2_t" else "vqav2", inputs, "coco", None))
    for name, qa in (("gqa", VQA_EN), ("gqa_t", VQA_ZH)):
        gqa = {str(k): {"imageId": "2354786", "question": q, "answer": a} for k, (q, a) in enumerate(qa)}
        write_json(raw / name / "train_balanced_questions.json", gqa)
        jobs.append((name, "gqa", [raw / name / "train_balanced_questions.json"], "gqa", None))
    textvqa = [
        {"question": q, "image_id": "0054c91397f2fe05", "answers": [a] * 10, "question_id": k}
        for k, (q, a) in enumerate(VQA_EN)
    ]
    write_json(raw / "TextVQA_0.5.1_train.json", {"dataset_name": "textvqa", "data": textvqa})
    jobs.append(("textvqa", "textvqa", [raw / "TextVQA_0.5.1_train.json"], "textvqa", None))
    book = {"imageURL": "http://x/51Y5.jpg", "questions": [q for q, _ in VQA_EN], "answers": [a for _, a in VQA_EN]}
    write_json(raw / "ocr-vqa" / "dataset.json", {"761183272": book | {"title": "t", "split": 1}})
    jobs.append(("ocrvqa", "ocr-vqa", [raw / "ocr-vqa" / "dataset.json"], "ocrvqa", None))

    for name, folder, refs_file in (
        ("refcoco", "refcoco", "refs(unc).p"),
        ("refcoco_plus", "refcoco+", "refs(unc).p"),
        ("refcocog", "refcocog", "refs(umd).p"),
    ):
        refcoco_files(raw / folder, [ref(0, 10, "train", "man on the left"), ref(1, 11, "train", "左边的男人")])
        if refs_file != "refs(unc).p":
            os.rename(raw / folder / "refs(unc).p", raw / folder / refs_file)
        jobs.append((name, folder, [raw / folder / refs_file], "coco", None))
    region = {"region_id": 1, "image_id": 1, "phrase": "a red cat", "x": 10, "y": 10, "width": 30, "height": 20}
    write_json(
        raw / "vg" / "image_data.json", [{"image_id": 1, "width": 64, "height": 48, "url": "http://x/VG_100K/1.jpg"}]
    )
    write_json(raw / "vg" / "region_descriptions.json", [{"id": 1, "regions": [region]}])
    jobs.append(("visual_genome", "visual-genome", [raw / "vg" / "region_descriptions.json"], "visual_genome", None))

    turns = lambda *values: [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(values)]
    for name, (q, a) in (("llava", VQA_EN[0]), ("llava_t", VQA_ZH[0])):
        entry = {"id": "1", "image": "000000033471.jpg", "conversations": turns(f"<image>\n{q}", a, q, a)}
        write_json(raw / name / "llava_instruct_150k.json", [entry])
        jobs.append((name, "llava", [raw / name / "llava_instruct_150k.json"], "coco/train2017", None))
    # `bmmic filter` writes the manifest itself, its images relative to the COCO folder it generated from
    bmmic = {"id": "1", "image": "COCO_train2014_000000000001.jpg", "conversations": turns(*VQA_ZH[1])}
    os.makedirs(data / "bmmic")
    (data / "bmmic" / "train.jsonl").write_text(json.dumps(bmmic, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, (q, a) in (("m3it", VQA_EN[1]), ("m3it_t", VQA_ZH[1])):
        line = {
            "instruction": q,
            "inputs": "",
            "outputs": a,
            "image_base64_str": [base64.b64encode(image_bytes()).decode()],
        }
        os.makedirs(raw / name)
        (raw / name / "train.jsonl").write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
        jobs.append((name, "m3it", [raw / name / "train.jsonl"], None, None))
    svit = [{"image_id": 1, "conversations": [{"content": turns(*VQA_EN[0], *VQA_EN[1])}]}]
    write_json(raw / "svit" / "conversation.json", svit)
    jobs.append(("svit", "svit", [raw / "svit" / "conversation.json"], "visual_genome", None))

    for name, fmt, inputs, images, split in jobs:
        args = ["convert", "--format", fmt, "--out", str(data / name / "train.jsonl")]
        args += [a for path in inputs for a in ("--input", str(path))]
        args += ["--images", str(data / images)] if images else []
        assert data_cli(args) == 0, name
        with open(data / name / "train.jsonl", encoding="utf-8") as f:
            assert f.read().strip(), f"{name}: no records"
    for name in ("coco_cn", "vqav2", "flickr30k"):  # the benchmarks' released files, as `evaluate` reads them
        shutil.copytree(EVAL_FILES, data / "eval" / name)
        make_images(data / "eval" / name)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    raw, data = tmp_path_factory.mktemp("released"), tmp_path_factory.mktemp("data")
    released_data(raw, data)
    return str(data)


@pytest.mark.parametrize("variant", ["chat", "base"])
def test_three_stages_train_from_released_weights_and_data(variant, released_weights, data_dir, tmp_path):
    spec = f"{CONFIGS[variant]}:smoke=1,init={released_weights[variant]},data_dir={data_dir}"
    rc, stdout, stderr = run("-m", "ziya_jax.train", "--config", spec, "--workdir", str(tmp_path))
    assert rc == 0, stderr[-3000:]
    # stage 1 starts from the converted release, each later stage from the one before it
    starts = [released_weights[variant], tmp_path / "stage1" / "model", tmp_path / "stage2" / "model"]
    assert [line.split()[3].rstrip(":") for line in stderr.splitlines() if "init_from" in line] == list(
        map(str, starts)
    )
    for stage in ("stage1", "stage2", "stage3"):
        metrics = [json.loads(line) for line in open(tmp_path / stage / "metrics.jsonl")]
        assert metrics and all(np.isfinite(m["loss"]) and m["skipped"] == 0 for m in metrics)
        scores = json.load(open(tmp_path / stage / "eval.json"))["benchmarks"]
        assert set(scores) == ({"retrieval_coco_cn"} if stage == "stage1" else {"vqav2", "flickr30k"})
        assert os.path.isdir(tmp_path / stage / "model" / "tokenizer")
    assert len(metrics) == 2 and "skipped samples" not in stdout  # 2 steps; every converted record was read
    # the stage-1 heads survive into the final model: retrieval as a user runs it on the stage-3 model
    rc, stdout, stderr = run(
        "-m", "ziya_jax.evaluate", "--checkpoint", str(tmp_path / "stage3" / "model"), "--task", "retrieval",
        "--data", os.path.join(data_dir, "eval", "coco_cn"), "--retrieval-set", "coco_cn",
        "--out", str(tmp_path / "eval"),
    )  # fmt: skip
    assert rc == 0, stderr[-3000:]
    retrieval = json.load(open(tmp_path / "eval" / "retrieval_coco_cn.scores.json"))
    assert {"IR@1", "TR@1"} <= set(retrieval) and retrieval["n_images"] > 1


def test_fine_tuning_round_trip_matches_transformers(released_weights, data_dir, tmp_path):
    """A user's fine-tuning: released InstructBLIP + Llama -> `convert from-hf` -> stage 3 with LoRA -> `convert
    to-hf` -> transformers' from_pretrained gives the logits ziya_jax gives on the trained weights."""
    spec = f"{CONFIGS['chat']}:smoke=1,stage=3,init={released_weights['chat']},data_dir={data_dir}"
    train = (
        "-m",
        "ziya_jax.train",
        "--config",
        spec,
        "--workdir",
        str(tmp_path / "run"),
        "--config.eval.benchmarks=[]",
    )
    rc, _, stderr = run(*train)
    assert rc == 0, stderr[-3000:]
    assert f"init_from {released_weights['chat']}:" in stderr  # the stage starts from the converted release
    model_dir = tmp_path / "run" / "model"
    rc, stdout, stderr = run(
        "-m", "ziya_jax.convert", "to-hf", "--checkpoint", str(model_dir), "--out", str(tmp_path / "hf")
    )
    assert rc == 0 and "merged LoRA" in stdout, stderr

    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    released = hf_model("chat")
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    trained, before = exported.state_dict(), released.state_dict()
    assert not torch.equal(trained[name], before[name])  # the LoRA update, merged
    embed = "language_model.model.embed_tokens.weight"  # frozen, kept in bf16: the release's, rounded once
    assert torch.equal(trained[embed], before[embed].to(torch.bfloat16).float())

    params, cfg = load_model(str(model_dir))
    cfg = dataclasses.replace(cfg, dtype="float32")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    g = torch.Generator().manual_seed(0)
    q, n = SMOKE["num_query_tokens"], 7
    ids = torch.randint(3, 600, (2, q + n), generator=g)
    ids[:, :q] = SMOKE["image_token_id"]
    mask = torch.ones_like(ids)
    mask[1, q + 4 :] = 0
    pixels = torch.randn(2, 3, SMOKE["vision"]["image_size"], SMOKE["vision"]["image_size"], generator=g)
    qids = torch.randint(5, 100, (2, 6), generator=g)
    qmask = torch.ones_like(qids)
    with torch.no_grad():
        theirs = exported(
            pixel_values=pixels,
            input_ids=ids,
            attention_mask=mask,
            qformer_input_ids=qids,
            qformer_attention_mask=qmask,
        ).logits.numpy()
    ours = ZiyaVisual(cfg).apply(
        {"params": params},
        jnp.asarray(ids.numpy()),
        jnp.asarray(mask.numpy()),
        jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)[:, None]),
        jnp.asarray(qids.numpy()),
        jnp.asarray(qmask.numpy()),
    )
    valid = mask.numpy().astype(bool)
    assert np.abs(np.asarray(ours)[valid] - theirs[valid]).max() < 1e-4


def test_a_missing_folder_is_one_line_naming_its_key_and_path(released_weights, data_dir, tmp_path):
    chat = CONFIGS["chat"]
    cases = [
        (f"{chat}:smoke=1,data_dir={data_dir}", "stages.stage1.data.tokenizers is not set"),
        (
            f"{chat}:smoke=1,init={tmp_path}/nothing,data_dir={data_dir}",
            f"stages.stage1.data.tokenizers='{tmp_path}/nothing/tokenizer': no such folder",
        ),
        (
            f"{chat}:smoke=1,init={released_weights['chat']},data_dir={tmp_path}/nowhere",
            f"stages.stage1.data.sources[0] (pairs_en): no manifest at {tmp_path}/nowhere/pairs_en/train.jsonl",
        ),
    ]
    for spec, message in cases:
        rc, _, stderr = run("-m", "ziya_jax.train", "--config", spec, "--workdir", str(tmp_path / "w"))
        assert rc == 2 and stderr.startswith(f"error: {message}") and len(stderr.strip().splitlines()) == 1, stderr
