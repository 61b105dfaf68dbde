"""python -m ziya_jax.data bmmic against the scripted chat-completions server over loopback HTTP: generate +
translate + rewrite + filter on COCO-style fixtures into a manifest the training pipeline reads; VQAv2 / GQA (T)
files the evaluator reads; a kill -9 mid-run and a resumed run; shards; every filter rule; and
`python -m ziya_jax.serve` as the endpoint."""

import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from llm_server import ScriptedServer, ScriptedSubprocess, answered_counts, last_user_text
from PIL import Image

from ziya_jax.data.bmmic import filters, prompting
from ziya_jax.data.bmmic.__main__ import main as bmmic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
NUM_IMAGES = 50
LABELS = ("dog", "cat", "car", "bicycle", "person", "frisbee")
ZH = {"dog": "狗", "cat": "猫", "car": "汽车", "bicycle": "自行车", "person": "男人", "frisbee": "飞盘"}
SYSTEMS = {
    p.system: (stage, task, lang)
    for stage in ("generate", "translate", "rewrite")
    for task, langs in prompting.load(stage).items()
    for lang, p in langs.items()
}
# Markers of the replies crafted to be rejected, and the rule each must trip.
GIRAFFE, SORRY, BAD_BOX = "giraffe", "抱歉", "[100,200,1500,300]"


def image_name(i: int) -> str:
    return f"COCO_val2014_{i:012d}.jpg"


def labels_of(i: int) -> list[str]:
    return [LABELS[i % len(LABELS)], LABELS[(i + 2) % len(LABELS)]][: 1 + i % 2]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """NUM_IMAGES tiny images with COCO captions and instances files, and VQAv2 and GQA question files."""
    root = tmp_path_factory.mktemp("coco")
    images, captions, boxes = [], [], []
    rng = np.random.default_rng(0)
    for i in range(1, NUM_IMAGES + 1):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / image_name(i))
        images.append({"id": i, "file_name": image_name(i), "width": 40, "height": 30})
        names = labels_of(i)
        captions.append({"id": 2 * i, "image_id": i, "caption": f"Photo {i}: a {' and a '.join(names)} outdoors."})
        captions.append({"id": 2 * i + 1, "image_id": i, "caption": f"Photo {i} shows a {names[0]}."})
        for k, name in enumerate(names):
            boxes.append({"id": 10 * i + k, "image_id": i, "category_id": LABELS.index(name), "bbox": [4, 3, 20, 15]})
    categories = [{"id": k, "name": n} for k, n in enumerate(LABELS)]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": boxes, "categories": categories}))
    vqa = root / "vqav2"
    vqa.mkdir()
    questions, annotations = [], []
    for i in range(1, 11):
        qid = i * 1000 + 7
        questions.append({"image_id": i, "question": f"How many {labels_of(i)[0]}s are there?", "question_id": qid})
        answers = ["1", "1", "one", "yes"] + ["1"] * 6
        annotations.append(
            {
                "question_id": qid,
                "image_id": i,
                "question_type": "how many",
                "answer_type": "number",
                "multiple_choice_answer": "1",
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": n + 1} for n, a in enumerate(answers)
                ],
            }
        )
    info = {"info": {"description": "fixture"}, "license": {"name": "fixture"}, "data_subtype": "val2014"}
    (vqa / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(info | {"questions": questions}))
    (vqa / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(info | {"annotations": annotations}))
    gqa = root / "gqa"
    gqa.mkdir()
    gqa_questions = {
        f"0{i}": {
            "imageId": image_name(i)[:-4],
            "question": f"Is there a {labels_of(i)[0]} in the picture?",
            "answer": "yes",
            "fullAnswer": f"Yes, there is a {labels_of(i)[0]}.",
            "types": {"structural": "verify"},
        }
        for i in range(1, 6)
    }
    (gqa / "testdev_balanced_questions.json").write_text(json.dumps(gqa_questions))
    return root


def fake_zh(text: str) -> str:
    """A stand-in translation: <image> placeholders, boxes and numbers kept, yes/no as 是/否, other text as CJK
    characters derived from it."""
    if text.strip().lower() in ("yes", "no"):
        return {"yes": "是", "no": "否"}[text.strip().lower()]
    out = []
    for part in re.split(r"(<image>|\[[\d,]+\]|\d+)", text):
        if part == "<image>" or re.fullmatch(r"\[[\d,]+\]|\d+", part or "x"):
            out.append(part)
        elif part.strip():
            lead = part[: len(part) - len(part.lstrip())]
            out.append(lead + "".join(chr(0x4E00 + ord(c) % 400) for c in part if c.isalpha()) + "。")
    return "".join(out) or text


def generated(lang: str, task: str, user: str) -> list[dict]:
    """A conversation made of the request's captions and boxes, some crafted for the filter to reject."""
    i = int(re.search(r"Photo (\d+)", user).group(1))
    objects = re.findall(r"^- (.+?): (\[\d+,\d+,\d+,\d+\])$", user, re.M)
    label, box = objects[0]
    if lang == "en":
        turns = {
            "conversation": ("What is in the picture?", f"There is a {label} in the picture, at {box}."),
            "detail": ("Describe the image in detail.", f"Photo {i} shows a {label} outdoors, inside {box}."),
            "complex_reasoning": (f"Why might the {label} be here?", f"A {label} like this is common outdoors."),
        }[task]
        if task == "conversation" and i % 10 == 3:
            turns = (turns[0], f"There is a {label} next to a {GIRAFFE}.")
        if task == "detail" and i % 10 == 5:
            turns = (turns[0], f"Photo {i} shows a {label} at {BAD_BOX}.")
    else:
        name = ZH[label]
        turns = {
            "conversation": ("图片里有什么？", f"图片里有一个{name}，位置是{box}。"),
            "detail": ("请详细描述这张图片。", f"第{i}张照片在户外拍摄，画面中的{name}位于{box}。"),
            "complex_reasoning": (f"为什么这里会有{name}？", f"这样的{name}在户外很常见，所以出现在这里并不奇怪。"),
        }[task]
        if task == "conversation" and i % 10 == 7:
            turns = (turns[0], f"{SORRY}，我无法看到这张图片。")
    return [{"from": "human", "value": turns[0]}, {"from": "gpt", "value": turns[1]}]


REWRITTEN = {
    "en": {
        "deepening": ("Think about causes and effects here.", "Looking deeper, the setting explains it well."),
        "concretizing": ("Name the exact thing you mean.", "To be concrete, the named object is the one."),
        "increasing_reasoning": ("Reason step by step first.", "Step one, observe; step two, conclude."),
        "adding_constraints": ("Answer in one short sentence.", "In one short sentence, as asked."),
    },
    "zh": {
        "deepening": ("请深入思考其中的原因和结果。", "深入来看，周围的环境很好地说明了这一点。"),
        "concretizing": ("请说出你所指的具体东西。", "具体来说，就是前面提到的那个东西。"),
        "increasing_reasoning": ("请先一步一步地推理。", "第一步观察，第二步得出结论。"),
        "adding_constraints": ("请用一句简短的话回答。", "按要求用一句简短的话回答。"),
    },
}


def reply(body: dict, attempt: int) -> str:
    """The scripted LLM: tells the stage by the system message and answers in the format the stage asks."""
    stage, task, lang = SYSTEMS[body["messages"][0]["content"]]
    user = last_user_text(body)
    if stage == "generate":
        return json.dumps(generated(lang, task, user), ensure_ascii=False)
    if stage == "translate":
        return json.dumps([fake_zh(t) for t in json.loads(user)], ensure_ascii=False)
    conversation = json.loads(user.rsplit("\n", 1)[-1])  # the conversation is the message's last line
    question, answer = REWRITTEN[lang][task]
    return json.dumps(
        [
            {
                "from": t["from"],
                "value": f"{question} {t['value']}" if t["from"] == "human" else f"{t['value']} {answer}",
            }
            for t in conversation
        ],
        ensure_ascii=False,
    )


def endpoint(server) -> list[str]:
    return ["--base-url", server.base_url, "--model", "scripted", "--no-progress", "--retry-backoff", "0.01"]


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def generate_args(coco, out, *extra) -> list[str]:
    return [
        "generate",
        "--captions",
        f"coco:{coco / 'captions.json'}",
        "--boxes",
        f"coco:{coco / 'instances.json'}",
        "--image-dir",
        str(coco),
        "--examples",
        "1",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def server():
    with ScriptedServer(reply) as s:
        yield s


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from ziya_jax.data import synthetic, tokenizers

    llm, q = synthetic.train_demo_tokenizers(str(tmp_path_factory.mktemp("tok")), num_scenes=60)
    return tokenizers.SentencePieceTokenizer.load(llm), tokenizers.QFormerTokenizer.from_sentencepiece(q)


def test_generate_translate_rewrite_filter_feed_the_training_pipeline(coco, server, toks, tmp_path):
    from ziya_jax.data.manifest import ManifestSource
    from ziya_jax.data.pipeline import DataConfig, Source, instruction_batches

    gen = tmp_path / "gen.jsonl"
    assert bmmic(generate_args(coco, gen, *endpoint(server))) == 0
    records = read_jsonl(gen)
    assert len(records) == NUM_IMAGES * 3 * 2
    assert Counter((r["bmmic"]["type"], r["lang"]) for r in records) == {
        (t, lang): NUM_IMAGES for t in prompting.TYPES for lang in ("en", "zh")
    }
    first = records[0]
    assert first["image"] == image_name(1) and first["conversations"][0]["value"].startswith("<image>\n")
    assert first["bmmic"]["tags"] == labels_of(1)
    # COCO's [x, y, w, h] = [4, 3, 20, 15] on a 40x30 image, in the 0..999 convention.
    assert first["bmmic"]["objects"][0]["box"] == [100, 100, 600, 600]
    report = json.loads((tmp_path / "gen.jsonl.report.json").read_text())
    assert report["llm"]["answered"] == len(records) and report["llm"]["failed"] == 0

    english = tmp_path / "gen_en.json"
    english.write_text(json.dumps([r for r in records if r["lang"] == "en"]))
    translated = tmp_path / "llava_zh.json"
    assert (
        bmmic(["translate", "--format", "llava", "--input", str(english), "--out", str(translated), *endpoint(server)])
        == 0
    )
    zh = json.loads(translated.read_text())
    assert [r["id"] for r in zh] == [r["id"] for r in records if r["lang"] == "en"]
    assert all(r["lang"] == "zh" and r["conversations"][0]["value"].startswith("<image>\n") for r in zh)

    rewritten = tmp_path / "rewritten.jsonl"
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:40]))
    assert bmmic(["rewrite", "--input", str(subset), "--out", str(rewritten), *endpoint(server)]) == 0
    rewrites = read_jsonl(rewritten)
    assert len(rewrites) == 40 * 4
    assert {r["bmmic"]["scheme"] for r in rewrites} == set(prompting.SCHEMES)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in rewrites)

    final = tmp_path / "final.jsonl"
    inputs = [str(gen), str(translated), str(rewritten)]
    assert bmmic(["filter", "--input", *inputs, "--out", str(final), "--rejected", str(tmp_path / "rej.jsonl")]) == 0
    everything = records + zh + rewrites
    expected = Counter()
    for r in everything:
        text = json.dumps(r["conversations"], ensure_ascii=False)
        if GIRAFFE in text:
            expected["absent_object"] += 1
        elif SORRY in text:
            expected["refusal"] += 1
        elif BAD_BOX in text:
            expected["bad_box"] += 1
    assert expected["absent_object"] and expected["refusal"] and expected["bad_box"]
    report = json.loads((tmp_path / "final.jsonl.report.json").read_text())
    assert report["rejected"] == dict(expected)
    kept = read_jsonl(final)
    assert len(kept) == len(everything) - sum(expected.values()) == report["kept"]

    source = ManifestSource(final, image_dir=coco)
    cfg = DataConfig(
        batch_size=4,
        text_len=256,
        image_size=28,
        num_query_tokens=4,
        image_token_id=toks[0].vocab_size,
        max_images=1,
        qformer_text_len=24,
        seed=0,
    )
    batch = next(iter(instruction_batches([Source(source, "conversation")], cfg, *toks, 0, 1)))
    assert batch["input_ids"].shape == (4, 256) and batch["pixel_values"].shape == (4, 1, 28, 28, 3)
    assert batch["image_mask"].sum() == 4 and (batch["loss_mask"].sum(axis=1) > 0).all()


def test_translated_vqav2_and_gqa_are_read_by_the_evaluator(coco, server, tmp_path):
    from ziya_jax.evaluate.tasks import load_items

    out = tmp_path / "vqav2_zh"
    assert (
        bmmic(["translate", "--format", "vqav2", "--input", str(coco / "vqav2"), "--out", str(out), *endpoint(server)])
        == 0
    )
    items = load_items("vqav2", str(out), str(coco), "val2014", None)
    original = json.loads((coco / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    assert [it.id for it in items] == [str(q["question_id"]) for q in original["questions"]]
    for it, q in zip(items, original["questions"]):
        assert it.question == fake_zh(q["question"])
        assert sorted(set(it.answers)) == sorted({"1", fake_zh("one"), "是"})
        assert it.image.endswith(image_name(q["image_id"]))
    translated = json.loads((out / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    assert translated["info"] == original["info"]

    out = tmp_path / "gqa_zh"
    assert (
        bmmic(["translate", "--format", "gqa", "--input", str(coco / "gqa"), "--out", str(out), *endpoint(server)]) == 0
    )
    items = load_items("gqa", str(out), str(coco), "testdev", None)
    assert [it.id for it in items] == [f"0{i}" for i in range(1, 6)]
    assert all(it.answers == ["是"] for it in items)
    content = json.loads((out / "testdev_balanced_questions.json").read_text())
    assert content["01"]["types"] == {"structural": "verify"} and content["01"]["imageId"] == image_name(1)[:-4]


def test_translated_m3it_keeps_its_layout(server, tmp_path):
    lines = [
        {
            "instruction": "Answer the question.",
            "inputs": "What is the dog doing?",
            "outputs": "It runs.",
            "image_base64_str": ["aGVsbG8="],
        },
        {
            "instruction": "Describe the image briefly.",
            "inputs": "",
            "outputs": "A red car.",
            "image_base64_str": ["d29ybGQ="],
        },
    ]
    source = tmp_path / "m3it.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "m3it_zh.jsonl"
    assert bmmic(["translate", "--format", "m3it", "--input", str(source), "--out", str(out), *endpoint(server)]) == 0
    expected = [line | {k: fake_zh(line[k]) for k in ("instruction", "inputs", "outputs") if line[k]} for line in lines]
    assert read_jsonl(out) == expected


def test_scenes_from_karpathy_ai_challenger_and_detector_files(tmp_path):
    from ziya_jax.data.bmmic.scenes import read_scenes

    Image.new("RGB", (200, 100)).save(tmp_path / "a.jpg")
    Image.new("RGB", (50, 50)).save(tmp_path / "b.jpg")
    karpathy = {"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A cat. "}]}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    aic = [{"image_id": "b.jpg", "url": "http://example.invalid/b.jpg", "caption": ["两个人在街上走。", "街上有人。"]}]
    (tmp_path / "aic.json").write_text(json.dumps(aic, ensure_ascii=False))
    detections = [
        {"image": "a.jpg", "label": "cat", "box": [20, 10, 120, 90], "score": 0.9},
        {"image": "a.jpg", "label": "sofa", "box": [0, 0, 200, 100], "score": 0.2},
        {"image": "b.jpg", "label": "person", "box": [0, 0, 25, 50], "score": 0.8},
    ]
    (tmp_path / "det.jsonl").write_text("".join(json.dumps(d) + "\n" for d in detections))
    captions = [("karpathy", str(tmp_path / "dataset_flickr30k.json")), ("aic", str(tmp_path / "aic.json"))]
    found = read_scenes(captions, [("detector", str(tmp_path / "det.jsonl"))], str(tmp_path), min_score=0.5)
    assert [(s.image, s.width, s.height, s.captions, s.tags) for s in found] == [
        ("a.jpg", 200, 100, ["A cat."], ["cat"]),
        ("b.jpg", 50, 50, ["两个人在街上走。", "街上有人。"], ["person"]),
    ]
    assert found[0].objects() == [{"label": "cat", "box": [100, 100, 600, 900]}]


def test_send_images_puts_each_image_in_its_request(coco, tmp_path):
    seen = {}

    def remember(body, attempt):
        parts = body["messages"][-1]["content"]
        seen[last_user_text(body)] = parts[0]["image_url"]["url"]
        return reply(body, attempt)

    with ScriptedServer(remember) as scripted:
        flags = ["--types", "detail", "--langs", "en", "--limit", "2", "--send-images", *endpoint(scripted)]
        assert bmmic(generate_args(coco, tmp_path / "gen.jsonl", *flags)) == 0
    assert len(seen) == 2
    for i in (1, 2):
        url = next(u for text, u in seen.items() if f"Photo {i}:" in text)
        assert url == "data:image/jpeg;base64," + base64.b64encode((coco / image_name(i)).read_bytes()).decode()


def test_shards_concatenate_to_the_single_run(coco, server, tmp_path):
    flags = ["--types", "detail", "--limit", "20", *endpoint(server)]
    assert bmmic(generate_args(coco, tmp_path / "all.jsonl", *flags)) == 0
    parts = []
    for k in range(3):
        out = tmp_path / f"part{k}.jsonl"
        assert bmmic(generate_args(coco, out, *flags, "--shard", f"{k}/3")) == 0
        parts.append(out.read_text())
    assert "".join(parts) == (tmp_path / "all.jsonl").read_text()
    assert all(parts) and len((tmp_path / "all.jsonl").read_text().splitlines()) == 40


@pytest.mark.slow
def test_a_rerun_after_kill_9_resumes_from_the_cache(coco, tmp_path):
    """The client is killed while the server holds its requests after the first few answers; the rerun asks only
    what was not committed, and writes what an uninterrupted run writes."""
    release = tmp_path / "release"
    spec = tmp_path / "spec.py"
    spec.write_text(
        f"import os, sys\nsys.path.insert(0, {TESTS!r})\nfrom test_bmmic import reply\n"
        f"def gate(answered):\n    return answered < 8 or os.path.exists({str(release)!r})\n"
    )
    concurrency = 3
    with ScriptedSubprocess(str(spec), str(tmp_path)) as server:
        flags = [*endpoint(server), "--limit", "15", "--concurrency", str(concurrency)]
        command = [sys.executable, "-m", "ziya_jax.data", "bmmic", *generate_args(coco, tmp_path / "out.jsonl", *flags)]
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while server.waiting() < concurrency:  # the run is held mid-way
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the run never reached the held requests"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        assert not (tmp_path / "out.jsonl").exists()
        answered = server.answered()
        assert answered >= 8
        db = sqlite3.connect(tmp_path / "out.jsonl.cache.sqlite")
        (cached,) = db.execute("SELECT COUNT(*) FROM replies").fetchone()
        db.close()
        assert answered - concurrency <= cached <= answered
        release.touch()
        assert subprocess.run(command, cwd=ROOT, capture_output=True).returncode == 0
        counts = answered_counts(server.log)
        requests = 15 * 3 * 2
        assert len(counts) == requests
        assert sum(n - 1 for n in counts.values()) <= concurrency  # only those in flight at the kill, again
        assert bmmic(generate_args(coco, tmp_path / "fresh.jsonl", *flags)) == 0
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "fresh.jsonl").read_text()
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == requests


def turns(*pairs) -> list[dict]:
    return [{"from": role, "value": v} for q, a in pairs for role, v in (("human", q), ("gpt", a))]


def rec(conversations, lang="en", image="a.jpg", **meta) -> dict:
    record = {"id": "x", "image": image, "conversations": conversations, "lang": lang}
    return record | ({"bmmic": meta} if meta else {})


GOOD_EN = turns(("<image>\nWhat is the dog doing?", "The dog is running across the grass."))
GOOD_ZH = turns(("<image>\n这只狗在做什么？", "这只狗正在草地上奔跑。"))
FILTER_CASES = {
    # reason: ([bad records], [good twin records])
    "bad_json": ([rec("<image> not a list")], [rec(GOOD_EN)]),
    "bad_roles": (
        [rec([GOOD_EN[1], GOOD_EN[0]])],
        [rec(GOOD_EN)],
    ),
    "empty_turn": ([rec(turns(("<image>\nWhat is this?", "  ")))], [rec(turns(("<image>\nWhat is this?", "A dog.")))]),
    "overlong_turn": (
        [rec(turns(("<image>\nDescribe it.", "A dog runs. " * 400)))],
        [rec(turns(("<image>\nDescribe it.", "A dog runs. " * 300)))],
    ),
    "image_placeholder": (
        [
            rec(turns(("这只狗在做什么？", "这只狗正在草地上奔跑。")), "zh"),
            rec(turns(("<image>\nWhat?", "<image> a dog"))),
        ],
        [
            rec(GOOD_ZH, "zh"),
            rec(turns(("What?", "A dog.")), image=[]),
            rec(turns(("<image><image>\nWhich?", "The left one.")), image=["a.jpg", "b.jpg"]),
        ],
    ),
    "wrong_language": (
        [
            rec(turns(("<image>\nWhat is the dog doing?", "它在 running across the grass quickly")), "zh"),
            rec(GOOD_ZH, "en"),
        ],
        [rec(GOOD_ZH, "zh"), rec(turns(("<image>\nWhat does the sign say?", "It says 出口, which means exit.")))],
    ),
    "english_in_chinese": (
        [
            rec(
                turns(
                    (
                        "<image>\n这只狗在做什么？",
                        "这只狗正在草地上奔跑，the dog is very happy today，它非常开心，看起来很健康。",
                    )
                ),
                "zh",
            )
        ],
        [
            rec(
                turns(("<image>\n他穿着什么？", "他穿着一件印有 New York Times 字样的白色 T-shirt，看起来很精神。")),
                "zh",
            )
        ],
    ),
    "refusal": (
        [
            rec(turns(("<image>\nWhat is the dog doing?", "I'm sorry, but I cannot see the image."))),
            rec(turns(("<image>\nWhat is it?", "As an AI language model, I have no eyes."))),
            rec(turns(("<image>\n这只狗在做什么？", "抱歉，作为一个AI，我无法看到图片。")), "zh"),
            rec(turns(("<image>\n这只狗在做什么？", "我无法确定图中的内容。")), "zh"),
        ],
        [
            rec(turns(("<image>\nWhat is the dog doing?", "The dog is sorry-looking, with its head down."))),
            rec(turns(("<image>\n这只狗在做什么？", "这只狗低着头，看起来很无辜。")), "zh"),
        ],
    ),
    "bad_box": (
        [
            rec(turns(("<image>\nWhere is the dog?", "The dog is at [100,200,1000,300]."))),
            rec(turns(("<image>\nWhere is the dog?", "The dog is at [0.1,0.2,0.5,0.6]."))),
            rec(turns(("<image>\nWhere is the dog?", "The dog is at [500,200,100,300]."))),
        ],
        [rec(turns(("<image>\nWhere is the dog?", "The dog is at [100,200,999,300].")))],
    ),
    "absent_object": (
        [
            rec(GOOD_EN[:1] + [{"from": "gpt", "value": "The dog is chasing a cat."}], tags=["dog"], captions=[]),
            rec(GOOD_ZH[:1] + [{"from": "gpt", "value": "这只狗正在追一只猫。"}], "zh", tags=["dog"], captions=[]),
            rec(
                GOOD_EN[:1] + [{"from": "gpt", "value": "The dog sleeps next to a laptop."}], tags=["dog"], captions=[]
            ),
        ],
        [
            rec(
                GOOD_EN[:1] + [{"from": "gpt", "value": "The dog is chasing a cat."}], tags=["dog", "cat"], captions=[]
            ),
            rec(
                GOOD_EN[:1] + [{"from": "gpt", "value": "The dog is chasing a cat."}],
                tags=["dog"],
                captions=["A dog and a cat."],
            ),
            rec(
                GOOD_EN[:1] + [{"from": "gpt", "value": "The dog is eating a hot dog."}],
                tags=["dog", "hot dog"],
                captions=[],
            ),
            rec(GOOD_EN[:1] + [{"from": "gpt", "value": "The dog sits near a catalog."}], tags=["dog"], captions=[]),
            rec(GOOD_EN[:1] + [{"from": "gpt", "value": "It runs past a rock."}], tags=["dog", "rock"], captions=[]),
        ],
    ),
    "duplicate": (
        [rec(GOOD_EN), rec(GOOD_EN)],
        [rec(GOOD_EN), rec(GOOD_EN, image="b.jpg")],
    ),
    "near_duplicate": (
        [rec(GOOD_EN), rec(turns(("<image>\nWhat is the dog doing?", "The dog is running across the grass!")))],
        [rec(GOOD_EN), rec(turns(("<image>\nWhat colour is the dog?", "It is brown with a white tail.")))],
    ),
}


@pytest.mark.parametrize("reason", filters.REASONS)
def test_every_filter_rule_rejects_its_bad_case_and_passes_its_good_twin(reason):
    bad, good = FILTER_CASES[reason]
    if reason not in ("duplicate", "near_duplicate"):  # one image each, so that no two are duplicates
        bad, good = (
            [r | {"image": f"{k}.jpg"} if r["image"] == "a.jpg" else r for k, r in enumerate(rs)] for rs in (bad, good)
        )
    cfg, names = filters.FilterConfig(), filters.load_object_names()
    kept, rejected, counts = filters.filter_entries(bad, {}, cfg, names)
    duplicates = reason in ("duplicate", "near_duplicate")
    assert counts == {reason: 1 if duplicates else len(bad)}, [(r.reason, r.detail) for r in rejected]
    kept, rejected, counts = filters.filter_entries(good, {}, cfg, names)
    assert len(kept) == len(good) and not counts, [(r.reason, r.detail) for r in rejected]


def test_filter_counts_lines_that_are_not_json(tmp_path):
    manifest = tmp_path / "in.jsonl"
    manifest.write_text(json.dumps(rec(GOOD_EN)) + "\n{not json\n[1, 2]\n")
    assert bmmic(["filter", "--input", str(manifest), "--out", str(tmp_path / "out.jsonl")]) == 0
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report == {"stage": "filter", "read": 3, "kept": 1, "rejected": {"bad_json": 2}}


@pytest.mark.slow
def test_generate_against_the_project_server(tiny_chat, coco, tmp_path):
    """`python -m ziya_jax.serve` with the tiny untrained model as the endpoint: the requests (system message,
    images as data: URIs, the key from a file) are served; its answers are no JSON, so each is asked again once
    and then counted as rejected, and the run still ends well with nothing written."""
    from clis import Server
    from test_serve import save_variant

    checkpoint = save_variant(tiny_chat, tmp_path, context=1024)
    with Server(checkpoint, "--api-key-file", str(tmp_path / "key"), "--no-page") as server:
        flags = ["--types", "conversation", "--langs", "en", "--limit", "2", "--examples", "0", "--send-images"]
        flags += ["--max-tokens", "8", "--parse-retries", "1", "--no-progress", "--api-key-file", str(tmp_path / "key")]
        out = tmp_path / "gen.jsonl"
        argv = generate_args(coco, out, "--base-url", f"{server.url}/v1", "--model", "ckpt", *flags)
        assert bmmic(argv) == 0  # its --examples 0 overrides generate_args' 1: the context is 1024 tokens
    report = json.loads((tmp_path / "gen.jsonl.report.json").read_text())
    llm = report["llm"]
    assert (llm["requests"], llm["calls"], llm["failures"]) == (2, 4, {"rejected": 2})
    assert llm["retries"] == {"rejected": 2} and llm["prompt_tokens"] > 2 * 500 and llm["completion_tokens"] > 0
    assert out.read_text() == ""
