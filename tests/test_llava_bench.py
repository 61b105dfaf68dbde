"""LLaVA-Bench (ziya_jax.evaluate.llava_bench): the released file layouts (COCO and In-the-Wild, fixtures in
tests/data/llava_bench), LLaVA's review protocol against a scripted judge served over HTTP on loopback
(tests/llm_server.py), scores checked against values worked out by hand from the judge's scripted scores, and
`python -m ziya_jax.evaluate --task llava_bench` on conftest's tiny Chat model in English and Chinese."""

import collections
import json
import os
import shutil

import numpy as np
import pytest
from clis import run_cli
from llm_server import ScriptedServer, server_error
from PIL import Image

from ziya_jax.evaluate import llava_bench
from ziya_jax.evaluate.__main__ import main
from ziya_jax.llm import Endpoint, LLMClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "llava_bench")
COCO_IMAGES = ("000000100001.jpg", "000000100002.jpg")

# The judge's scores (reference's, model's) by question. By hand, per category: the means of each side and the
# relative score 100 x model / reference -> {category: (relative, model mean, reference mean)}.
EN_SCORES = {
    "What color is the kite in the sky?": (8, 4),  # conv: reference (8 + 8) / 2 = 8, model (4 + 6) / 2 = 5
    "How many boats are tied to the pier?": (8, 6),
    "Describe the following image.": (10, 5),  # detail: reference 8, model 4
    "Explain the visual content of the image in great detail.": (6, 3),
    "Why might the child be holding the string so tightly?": (9, 9),  # complex: reference 8, model 6
    "What could the weather be like later today, judging from the scene?": (7, 3),
}
EN_EXPECTED = {"conv": (62.5, 5, 8), "detail": (50.0, 4, 8), "complex": (75.0, 6, 8), "all": (62.5, 5, 8)}
ZH_SCORES = {
    "天空中的风筝是什么颜色的？": (9, 9),  # conv: reference 8, model 8
    "码头上系着几条船？": (7, 7),
    "描述下面这张图片。": (8, 2),  # detail: reference 8, model 3
    "详细解释图片中的视觉内容。": (8, 4),
    "孩子为什么可能把线握得这么紧？": (10, 8),  # complex: reference 8, model 7
    "从场景来看，今天晚些时候的天气可能怎样？": (6, 6),
}
ZH_EXPECTED = {"conv": (100.0, 8, 8), "detail": (37.5, 3, 8), "complex": (87.5, 7, 8), "all": (75.0, 6, 8)}


def question_of(body) -> str:
    """The question inside a review request (LLaVA's layout: '[Question]\\n...\\n\\n[Assistant 1]')."""
    content = body["messages"][-1]["content"]
    return content.split("[Question]\n", 1)[1].split("\n\n[Assistant 1]\n", 1)[0]


def answer_of(body) -> str:
    content = body["messages"][-1]["content"]
    return content.split("[Assistant 2]\n", 1)[1].split("\n\n[End of Assistant 2]", 1)[0]


def scripted(scores, bodies=None):
    """A judge replying with each question's scripted scores, in LLaVA's format; records the bodies."""

    def reply(body, attempt):
        if bodies is not None:
            bodies[question_of(body)] = body
        ref, model = scores[question_of(body)]
        return f"{ref} {model}\nAssistant 1 answers with more detail than Assistant 2."

    return reply


def write_images(folder, names, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(os.path.join(folder, name))


def coco_set(tmp_path, folder="coco"):
    """A copy of a COCO-layout fixture and a COCO val2014 folder holding its images -> (data, image_dir)."""
    data = tmp_path / folder
    shutil.copytree(os.path.join(DATA, folder), data)
    images = tmp_path / f"{folder}_val2014"
    write_images(images / "val2014", [f"COCO_val2014_{n}" for n in COCO_IMAGES])
    return str(data), str(images)


def client(server, cache, **kw):
    return LLMClient(Endpoint(server.base_url, "judge-model", "test-key", backoff=0.01), cache=str(cache), **kw)


def check_scores(scores, expected):
    for category, (relative, model, reference) in expected.items():
        assert scores[category]["relative"] == pytest.approx(relative)
        assert scores[category]["model"] == pytest.approx(model)
        assert scores[category]["reference"] == pytest.approx(reference)


def test_reads_the_released_layouts(tmp_path):
    data, images = coco_set(tmp_path)
    bench = llava_bench.read(data, images)
    assert bench.layout == "coco"
    assert [q.question_id for q in bench.questions] == [0, 1, 2, 3, 4, 5]
    assert [q.category for q in bench.questions] == ["conv", "detail", "complex"] * 2
    first, boats = bench.questions[0], bench.questions[3]
    assert first.context == (
        "A child flies a red kite in a park.\nA kid holding a kite string on the grass.\n\n"
        "person: [0.312, 0.45, 0.498, 0.962]\nkite: [0.58, 0.05, 0.77, 0.21]"
    )
    assert boats.text == "How many boats are tied to the pier?"
    assert boats.reference == "There are three boats tied to the pier."
    assert boats.reference_id == 3  # the COCO answers carry no answer_id: LLaVA names them by question_id
    assert boats.image == os.path.join(images, "val2014", "COCO_val2014_000000100002.jpg")
    with open(os.path.join(DATA, "coco", "rule.json")) as f:
        rules = json.load(f)
    assert bench.rule(first) == rules["conv"] and bench.rule(bench.questions[2]) == rules["complex"]
    assert len(llava_bench.read(data, images, limit=2).questions) == 2

    wild = tmp_path / "wild"
    shutil.copytree(os.path.join(DATA, "wild"), wild)
    write_images(wild / "images", ["001.jpg", "002.jpg"])
    bench = llava_bench.read(str(wild), rules=os.path.join(DATA, "coco", "rule.json"))
    assert bench.layout == "wild" and [q.category for q in bench.questions] == ["conv", "detail", "complex"]
    tower = bench.questions[0]
    assert tower.context == "A white lighthouse on a rocky shore under a clear sky."
    assert tower.reference == "It is a lighthouse on a rocky coast." and tower.reference_id == "Rf3Zq8sH2xkL9mPvWd6TaB"
    assert tower.image == str(wild / "images" / "001.jpg")
    assert bench.rule(tower) == rules["llava_bench_conv"]

    with pytest.raises(FileNotFoundError, match="--rules"):
        llava_bench.read(str(wild))  # In-the-Wild is released without rule.json
    with pytest.raises(FileNotFoundError, match="images are missing"):
        llava_bench.read(data, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="qa90_questions.jsonl"):
        llava_bench.read(str(tmp_path))
    answers = tmp_path / "coco" / "qa90_gpt4_answer.jsonl"
    answers.write_text("".join(answers.read_text().splitlines(keepends=True)[:5]))
    with pytest.raises(ValueError, match="no reference answer for question 5"):
        llava_bench.read(data, images)


@pytest.mark.parametrize(
    "review, scores",
    [
        ("8 7\nAssistant 1 is more detailed.", (8, 7)),  # LLaVA's format
        ("8,7", (8, 7)),
        ("8, 7.5\n", (8, 7.5)),
        ("\n\n9 6\nthen the explanation", (9, 6)),
        ("**8 7**\n", (8, 7)),
        ("8/10 7/10", (8, 7)),
        ("8，7", (8, 7)),
        ("8\t7", (8, 7)),
        ("  10   0  ", (10, 0)),
    ],
)
def test_parse_scores_accepts(review, scores):
    assert llava_bench.parse_scores(review) == scores


@pytest.mark.parametrize(
    "review",
    ["", "\n \n", "Assistant 1: 8, Assistant 2: 7", "8", "8 7 6", "11 3", "-1 5", "nan 5", "eight seven", "8\n7"],
)
def test_parse_scores_rejects(review):
    with pytest.raises(ValueError):
        llava_bench.parse_scores(review)


def test_judge_scores_by_hand_and_a_rerun_asks_nothing(tmp_path):
    data, images = coco_set(tmp_path)
    bench = llava_bench.read(data, images)
    answers = llava_bench.answer_records(bench, [f"answer {n}" for n in range(6)], "tiny")
    bodies = {}
    with ScriptedServer(scripted(EN_SCORES, bodies)) as server:
        with client(server, tmp_path / "cache.sqlite") as judge:
            reviews, scores, stats = llava_bench.judge(bench, answers, judge)
        assert server.answered() == 6 and stats.answered == 6
        check_scores(scores, EN_EXPECTED)
        assert scores["judged"] == 6 and scores["failed"] == [] and scores["all"]["n"] == 6
        assert [r["tuple"] for r in reviews] == [list(EN_SCORES[q.text]) for q in bench.questions]
        assert [r["category"] for r in reviews] == ["conv", "detail", "complex"] * 2
        assert [r["answer2_id"] for r in reviews] == [f"tiny:{n}" for n in range(6)]

        # the request as LLaVA's eval_gpt_review_visual.py writes it
        with open(os.path.join(DATA, "coco", "rule.json")) as f:
            prompt = json.load(f)["conv"]["prompt"]
        body = bodies["What color is the kite in the sky?"]
        assert body["model"] == "judge-model" and body["temperature"] == 0.2 and body["max_tokens"] == 1024
        assert body["messages"] == [
            {
                "role": "system",
                "content": "You are a helpful and precise assistant for checking the quality of the answer.",
            },
            {
                "role": "user",
                "content": "[Context]\nA child flies a red kite in a park.\nA kid holding a kite string on the grass."
                "\n\nperson: [0.312, 0.45, 0.498, 0.962]\nkite: [0.58, 0.05, 0.77, 0.21]\n\n"
                "[Question]\nWhat color is the kite in the sky?\n\n"
                "[Assistant 1]\nThe kite in the sky is red with a yellow tail.\n\n[End of Assistant 1]\n\n"
                "[Assistant 2]\nanswer 0\n\n[End of Assistant 2]\n\n"
                f"[System]\n{prompt}\n\n",
            },
        ]

        asked = len(server.log)
        with client(server, tmp_path / "cache.sqlite") as judge:
            again, rescored, stats = llava_bench.judge(bench, answers, judge)
        assert len(server.log) == asked, "a rerun must be answered from the cache"
        assert stats.cached == 6 and again == reviews and rescored["all"] == scores["all"]


def test_malformed_and_partial_reviews_are_asked_again_then_counted(tmp_path):
    data, images = coco_set(tmp_path)
    bench = llava_bench.read(data, images)
    answers = llava_bench.answer_records(bench, [f"answer {n}" for n in range(6)], "tiny")
    script = {  # question -> replies by attempt (the last one repeats)
        "What color is the kite in the sky?": ["Assistant 1 is better.\n8 4", "**8 4**\nBoth are close."],
        "Describe the following image.": ["10\nonly one score"],  # partial, every time
        "Why might the child be holding the string so tightly?": [server_error(), "9 9\nequal"],
        "How many boats are tied to the pier?": ["", "8, 6"],
        "Explain the visual content of the image in great detail.": ["6/10 3/10\nthe second is vague"],
        "What could the weather be like later today, judging from the scene?": ["7 3 2", "7\t3"],
    }
    asked = collections.Counter()

    def reply(body, attempt):
        question = question_of(body)
        asked[question] += 1
        replies = script[question]
        return replies[min(attempt, len(replies)) - 1]

    with ScriptedServer(reply) as server:
        with client(server, tmp_path / "cache.sqlite", parse_retries=2) as judge:
            reviews, scores, stats = llava_bench.judge(bench, answers, judge)
        assert asked == {
            "What color is the kite in the sky?": 2,
            "Describe the following image.": 3,  # asked, then asked again twice
            "Why might the child be holding the string so tightly?": 2,
            "How many boats are tied to the pier?": 2,
            "Explain the visual content of the image in great detail.": 1,
            "What could the weather be like later today, judging from the scene?": 2,
        }
        assert scores["judged"] == 5
        assert scores["failed"] == [{"question_id": 1, "error": "rejected", "reply": "10\nonly one score"}]
        assert reviews[1]["tuple"] == [-1, -1] and reviews[1]["error"] == "rejected"
        assert [r["tuple"] for r in reviews if r["question_id"] != 1] == [[8, 4], [9, 9], [8, 6], [6, 3], [7, 3]]
        # by hand, without question 1: detail has (6, 3) only; all: reference 8+9+8+6+7 = 38, model 4+9+6+3+3 = 25
        check_scores(scores, {"conv": (62.5, 5, 8), "detail": (50.0, 3, 6), "complex": (75.0, 6, 8)})
        assert scores["all"]["relative"] == pytest.approx(100 * 25 / 38) and scores["all"]["n"] == 5
        assert scores["detail"]["n"] == 1

        asked.clear()  # a rerun asks only the question left unjudged (failures are not cached)
        with client(server, tmp_path / "cache.sqlite", parse_retries=2) as judge:
            llava_bench.judge(bench, answers, judge)
        assert asked == {"Describe the following image.": 3}


def test_cli_judges_an_answer_file_and_refuses_missing_flags(tmp_path, capsys):
    data, images = coco_set(tmp_path)
    answer_file = tmp_path / "other_model.jsonl"
    answer_file.write_text(
        "".join(json.dumps({"question_id": n, "text": f"answer {n}"}) + "\n" for n in reversed(range(6)))
    )
    out = tmp_path / "out"
    flags = ["--task", "llava_bench", "--data", data, "--image-dir", images, "--out", str(out)]
    assert main([*flags, "--answers", str(answer_file)]) == 2
    assert "needs --judge-base-url" in capsys.readouterr().err
    with ScriptedServer(scripted(EN_SCORES)) as server:
        judge = ["--judge-base-url", server.base_url, "--judge-model", "judge-model"]
        assert main([*flags, *judge, "--answers", str(answer_file), "--checkpoint", str(tmp_path)]) == 2
        assert "not both" in capsys.readouterr().err
        assert main([*flags, *judge]) == 2
        assert "--checkpoint (answers from the model) or --answers" in capsys.readouterr().err
        assert server.answered() == 0
        assert main([*flags, *judge, "--answers", str(answer_file)]) == 0
    scores = json.loads((out / "llava_bench.scores.json").read_text())
    check_scores(scores, EN_EXPECTED)
    assert scores["answers"] == str(answer_file)
    answers = [json.loads(line) for line in (out / "llava_bench.answers.jsonl").read_text().splitlines()]
    assert [(a["question_id"], a["text"], a["model_id"]) for a in answers] == [
        (n, f"answer {n}", "other_model") for n in range(6)
    ]
    assert (out / "judge_cache.sqlite").exists()

    with ScriptedServer(lambda body, attempt: "Both answers are fine.") as server:
        judge = ["--judge-base-url", server.base_url, "--judge-model", "judge-model", "--judge-parse-retries", "0"]
        flags[-1] = str(tmp_path / "unjudged")
        assert main([*flags, *judge, "--answers", str(answer_file)]) == 2
        assert "the judge reviewed none of the 6 answers ({'rejected': 6})" in capsys.readouterr().err
        assert server.answered() == 6
    reviews = [
        json.loads(line) for line in (tmp_path / "unjudged" / "llava_bench.reviews.jsonl").read_text().splitlines()
    ]
    assert [r["tuple"] for r in reviews] == [[-1, -1]] * 6


def row(table: str, label: str) -> list[str]:
    return next(line for line in table.splitlines() if line.startswith(label))[len(label) :].split()


@pytest.mark.slow
def test_cli_on_a_tiny_chat_model_in_english_and_chinese(tiny_chat, tmp_path):
    checkpoint = tiny_chat[0] / "ckpt"
    key = tmp_path / "judge_key"
    key.write_text("test-key")
    out = tmp_path / "out"
    bodies = {}
    with ScriptedServer(scripted(EN_SCORES | ZH_SCORES, bodies)) as server:
        common = ["--checkpoint", checkpoint, "--task", "llava_bench", "--max-new-tokens", 6, "--batch-size", 6]
        judge = ["--judge-base-url", server.base_url, "--judge-model", "judge-model", "--judge-api-key-file", key]
        runs = {}
        for lang, folder in (("en", "coco"), ("zh", "coco_zh")):
            data, images = coco_set(tmp_path, folder)
            runs[lang] = run_cli(
                "evaluate", *common, "--data", data, "--image-dir", images, "--lang", lang, *judge, "--out", out
            )
        assert server.answered() == 12

    for lang, name, scripted_scores, expected in (
        ("en", "llava_bench", EN_SCORES, EN_EXPECTED),
        ("zh", "llava_bench_zh", ZH_SCORES, ZH_EXPECTED),
    ):
        scores = json.loads((out / f"{name}.scores.json").read_text())
        check_scores(scores, expected)
        assert scores["judged"] == 6 and scores["lang"] == lang and scores["checkpoint"] == str(checkpoint)
        answers = [json.loads(line) for line in (out / f"{name}.answers.jsonl").read_text().splitlines()]
        reviews = [json.loads(line) for line in (out / f"{name}.reviews.jsonl").read_text().splitlines()]
        assert [a["question_id"] for a in answers] == [r["question_id"] for r in reviews] == list(range(6))
        for a, r in zip(answers, reviews):
            assert answer_of(bodies[a["prompt"]]) == a["text"], "the judge must read the model's own answer"
            assert r["tuple"] == list(scripted_scores[a["prompt"]])
        table = runs[lang]
        relative = [f"{expected[c][0]:.1f}" for c in ("conv", "detail", "complex", "all")]
        assert row(table, "relative score") == relative
        assert row(table, "model mean") == [f"{expected[c][1]:.2f}" for c in ("conv", "detail", "complex", "all")]
        assert row(table, "reference mean") == ["8.00"] * 4
        assert row(table, "Ziya-Visual-Chat (paper)") == ["n/a"] * 3 + [{"en": "84.1", "zh": "86.7"}[lang]]

    # the paper-style table after both runs holds both languages beside the paper's numbers
    paper = runs["zh"].split("LLaVA-Bench relative score")[1]
    assert row(paper, "English ours") == [f"{EN_EXPECTED[c][0]:.1f}" for c in ("conv", "detail", "complex", "all")]
    assert row(paper, "Chinese ours") == [f"{ZH_EXPECTED[c][0]:.1f}" for c in ("conv", "detail", "complex", "all")]
    assert row(paper, "English Ziya-Visual-Chat (paper)")[-1] == "84.1"
    assert row(paper, "Chinese Ziya-Visual-Chat (paper)")[-1] == "86.7"
