"""LLaVA-Bench: the model answers LLaVA's questions about images, and an LLM judge (GPT-4 in LLaVA and the paper)
compares each answer with a reference answer that text-only GPT-4 wrote from the image's captions, by LLaVA's
review protocol. The Chinese set is a translation of the same files in the same layout.

Files, read from one folder DATA as they are released:

- COCO: DATA holds qa90_questions.jsonl, qa90_gpt4_answer.jsonl, caps_boxes_coco2014_val_80.jsonl and rule.json;
  the images are COCO val2014's (--image-dir, default DATA)
- In-the-Wild: DATA holds questions.jsonl, answers_gpt4.jsonl, context.jsonl and images/; rule.json (not part of
  that release) is DATA/rule.json or --rules

- questions: {"question_id", "image", "text", "category": conv | detail | complex}
- reference answers: {"question_id", "text", ["answer_id"]}, matched to the questions by question_id
- contexts, by "image": COCO {"captions": [...], "instances": [{"category", "bbox"}]}; In-the-Wild {"caption"}
- rule.json (LLaVA's llava/eval/table/rule.json): {key: {"role", "prompt"}}, key = the category (COCO) or
  "llava_bench_" + the category (In-the-Wild)
- a COCO image named NAME is IMAGE_DIR/NAME, IMAGE_DIR/COCO_val2014_NAME or IMAGE_DIR/val2014/COCO_val2014_NAME

One review request per question: the system message SYSTEM, then the user message

    [Context]\\n{captions, one a line}\\n\\n{boxes, "category: [x1, y1, x2, y2]" one a line}\\n\\n
    [Question]\\n{question}\\n\\n[{role} 1]\\n{reference}\\n\\n[End of {role} 1]\\n\\n
    [{role} 2]\\n{model's answer}\\n\\n[End of {role} 2]\\n\\n[System]\\n{prompt}\\n\\n

(In-the-Wild: the context is the caption alone, a list of captions one a line), at temperature 0.2 and at most
1024 tokens, as LLaVA's eval_gpt_review_visual.py and eval_gpt_review_bench.py send it. The review's first line
holds the two scores (reference's, model's; `parse_scores`). Per category and over all: both mean scores and the
relative score 100 x model mean / reference mean (LLaVA's summarize_gpt_review.py). A review still unparseable
after the judge was asked again is left out of the means and listed, where LLaVA's script would average its
[-1, -1] in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

from ziya_jax.data.annotations import field, load_json
from ziya_jax.evaluate.datasets import check_images

CATEGORIES = ("conv", "detail", "complex")
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_PARAMS = {"temperature": 0.2, "max_tokens": 1024}
MAX_SCORE = 10.0  # the rules' scale is 1 to 10
MAX_NEW_TOKENS = 512  # room for the detailed descriptions and reasoning the questions ask for


@dataclasses.dataclass(frozen=True)
class Layout:
    questions: str
    references: str
    contexts: str
    rule_prefix: str  # rule.json key = prefix + category
    images: str  # the images' folder inside DATA ("" = DATA itself)


LAYOUTS = {
    "coco": Layout("qa90_questions.jsonl", "qa90_gpt4_answer.jsonl", "caps_boxes_coco2014_val_80.jsonl", "", ""),
    "wild": Layout("questions.jsonl", "answers_gpt4.jsonl", "context.jsonl", "llava_bench_", "images"),
}


@dataclasses.dataclass
class Question:
    question_id: int | str  # as released
    image: str  # the image's path once found (the released name until then)
    text: str
    category: str
    context: str  # what the judge reads in place of the image
    reference: str
    reference_id: int | str

    @property
    def id(self) -> str:
        return str(self.question_id)


@dataclasses.dataclass
class Bench:
    layout: str  # coco | wild
    questions: list[Question]
    rules: dict  # rule key -> {"role", "prompt"}

    def rule(self, question: Question) -> dict:
        return self.rules[LAYOUTS[self.layout].rule_prefix + question.category]


def output_name(layout: str, lang: str) -> str:
    return "llava_bench" + ("_wild" if layout == "wild" else "") + ("_zh" if lang == "zh" else "")


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _by_id(rows: list[dict], path: str) -> dict:
    out = {}
    for row in rows:
        qid = field(row, "question_id", path, (int, str))
        if qid in out:
            raise ValueError(f"{path}: question_id {qid!r} appears twice")
        out[qid] = row
    return out


def _context(row: dict, layout: str, path: str) -> str:
    """The text the judge reads in place of the image, as LLaVA's review scripts build it; a caption given as one
    string is used as it is (joining it like a list would put a newline between its characters)."""
    if layout == "coco":
        captions = "\n".join(str(c) for c in field(row, "captions", path, list))
        boxes = "\n".join(
            f"{field(i, 'category', path, str)}: {field(i, 'bbox', path, list)}"
            for i in field(row, "instances", path, list)
        )
        return f"{captions}\n\n{boxes}"
    caption = field(row, "caption", path, (str, list))
    return caption if isinstance(caption, str) else "\n".join(str(c) for c in caption)


def _rules(path: str, keys: set[str]) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no judge rules at {path}: put LLaVA's rule.json (llava/eval/table/rule.json in its repository) "
            "there, or name it with --rules"
        )
    rules = load_json(path)
    if not isinstance(rules, dict):
        raise ValueError(f"{path}: expected {{category: {{role, prompt}}}}")
    for key in sorted(keys):
        if key not in rules:
            raise ValueError(f"{path} has no rule {key!r} for the questions of that category")
        field(rules[key], "role", f"{path}: rule {key}", str)
        field(rules[key], "prompt", f"{path}: rule {key}", str)
    return rules


def read(
    data: str,
    image_dir: str | None = None,
    rules: str | None = None,
    limit: int | None = None,
    allow_any_image_path: bool = False,
) -> Bench:
    """The benchmark in folder `data` (COCO or In-the-Wild, recognised by its questions file), checked: every
    question has a reference answer, a context, a rule and an image inside the image folder."""
    if not os.path.isdir(data):
        raise FileNotFoundError(f"{data}: not a folder (LLaVA-Bench is read from the folder holding its files)")
    layout = next((name for name, spec in LAYOUTS.items() if os.path.isfile(os.path.join(data, spec.questions))), None)
    if layout is None:
        raise FileNotFoundError(
            f"{data} holds neither {LAYOUTS['coco'].questions} (LLaVA-Bench COCO) nor "
            f"{LAYOUTS['wild'].questions} (LLaVA-Bench In-the-Wild)"
        )
    spec = LAYOUTS[layout]
    paths = {name: os.path.join(data, getattr(spec, name)) for name in ("questions", "references", "contexts")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing (LLaVA-Bench {layout} needs it beside {spec.questions})")
    references = _by_id(read_jsonl(paths["references"]), paths["references"])
    contexts = {}
    for row in read_jsonl(paths["contexts"]):
        contexts[field(row, "image", paths["contexts"], str)] = _context(row, layout, paths["contexts"])
    questions, seen = [], set()
    for row in read_jsonl(paths["questions"]):
        where = paths["questions"]
        qid = field(row, "question_id", where, (int, str))
        if qid in seen:
            raise ValueError(f"{where}: question_id {qid!r} appears twice")
        seen.add(qid)
        image = field(row, "image", where, str)
        if qid not in references:
            raise ValueError(f"{paths['references']} has no reference answer for question {qid!r}")
        if image not in contexts:
            raise ValueError(f"{paths['contexts']} has no context for image {image!r} (question {qid!r})")
        ref = references[qid]
        questions.append(
            Question(
                qid,
                image,
                field(row, "text", where, str),
                field(row, "category", where, str),
                contexts[image],
                field(ref, "text", paths["references"], str),
                ref.get("answer_id", qid),
            )
        )
    if not questions:
        raise ValueError(f"{paths['questions']} holds no questions; nothing to evaluate")
    questions = questions[:limit] if limit else questions
    rule_set = _rules(rules or os.path.join(data, "rule.json"), {spec.rule_prefix + q.category for q in questions})
    folder = image_dir or os.path.join(data, spec.images)

    def candidates(q: Question) -> list[str]:
        if layout == "wild":
            return [q.image]
        return [q.image, f"COCO_val2014_{q.image}", os.path.join("val2014", f"COCO_val2014_{q.image}")]

    check_images(questions, folder, candidates, allow_any_image_path)
    return Bench(layout, questions, rule_set)


def read_answers(path: str, bench: Bench) -> list[str]:
    """A LLaVA answer file (JSON lines {"question_id", "text", ...}) -> the answers in the bench's order."""
    answers = _by_id(read_jsonl(path), path)
    missing = [q.question_id for q in bench.questions if q.question_id not in answers]
    if missing:
        raise ValueError(f"{path} has no answer for {len(missing)} of the questions, e.g. {missing[:3]}")
    return [field(answers[q.question_id], "text", path, str) for q in bench.questions]


def generate_answers(bench: Bench, generator, decode, image_size: int) -> list[str]:
    """The model's answers (evaluate's Generator: the Ziya prompt, one image per question)."""
    from ziya_jax.data.images import load_image
    from ziya_jax.evaluate.inference import Prompt

    pixels = {}
    for q in bench.questions:  # 90 questions ask about 30 images
        if q.image not in pixels:
            pixels[q.image] = load_image(q.image, image_size)
    return generator([Prompt(q.text, pixels[q.image]) for q in bench.questions], decode, desc="llava_bench")


def review_content(bench: Bench, question: Question, answer: str) -> str:
    rule = bench.rule(question)
    role = rule["role"]
    return (
        f"[Context]\n{question.context}\n\n"
        f"[Question]\n{question.text}\n\n"
        f"[{role} 1]\n{question.reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule['prompt']}\n\n"
    )


def review_messages(bench: Bench, question: Question, answer: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": review_content(bench, question, answer)}]


_MARKUP = "*_`#> \t"
_OUT_OF_TEN = re.compile(r"\s*/\s*10(?![\d.])")


def parse_scores(review: str) -> tuple[float, float]:
    """(reference's score, model's score) from a review's first line. LLaVA's rule: the line, commas made spaces,
    is exactly two numbers. Tolerated beyond it: blank lines before it, markdown emphasis around it, several
    spaces or tabs, a full-width comma, '/10' after a score. Each score must lie in [0, 10]. Raises ValueError
    (the client then asks the judge again)."""
    lines = [line for line in review.splitlines() if line.strip()]
    if not lines:
        raise ValueError("empty review")
    first = lines[0].replace("，", ",").replace(",", " ").strip(_MARKUP)
    parts = _OUT_OF_TEN.sub("", first).split()
    if len(parts) != 2:
        raise ValueError(f"first line is not two scores: {lines[0][:80]!r}")
    try:
        scores = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"first line is not two scores: {lines[0][:80]!r}") from None
    if not all(0.0 <= s <= MAX_SCORE for s in scores):  # also refuses nan
        raise ValueError(f"scores outside 0..{MAX_SCORE:g}: {lines[0][:80]!r}")
    return scores


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(bench: Bench, verdicts: Sequence[tuple[float, float] | None]) -> dict:
    """Per category (conv, detail, complex, then any other in the data) and "all": n judged, both mean scores
    and the relative score; verdicts[i] is None where question i has no usable review."""
    categories = [c for c in CATEGORIES if any(q.category == c for q in bench.questions)]
    categories += sorted({q.category for q in bench.questions} - set(categories))
    out = {}
    for name in categories + ["all"]:
        judged = [v for q, v in zip(bench.questions, verdicts) if v is not None and name in ("all", q.category)]
        reference, model = _mean([v[0] for v in judged]), _mean([v[1] for v in judged])
        relative = 100.0 * model / reference if judged and reference > 0 else float("nan")
        out[name] = {"relative": relative, "model": model, "reference": reference, "n": len(judged)}
    return out


def answer_records(bench: Bench, answers: Sequence[str], model_id: str) -> list[dict]:
    """The answers as a LLaVA answer file (what its review scripts read)."""
    if len(answers) != len(bench.questions):
        raise ValueError(f"{len(answers)} answers for {len(bench.questions)} questions")
    return [
        {
            "question_id": q.question_id,
            "prompt": q.text,
            "text": answer,
            "answer_id": f"{model_id}:{q.question_id}",
            "model_id": model_id,
            "metadata": {},
        }
        for q, answer in zip(bench.questions, answers)
    ]


def judge(bench: Bench, answers: Sequence[dict], client):
    """Review every answer (`answer_records`) -> (review records as LLaVA writes them, scores, the client's
    RunStats). `client`: a ziya_jax.llm LLMClient, whose cache makes a rerun ask nothing it has an accepted
    review for."""
    from ziya_jax.llm import ChatRequest

    requests = [
        ChatRequest(review_messages(bench, q, a["text"]), dict(JUDGE_PARAMS)) for q, a in zip(bench.questions, answers)
    ]
    results, stats = client.run(requests, parse=parse_scores, desc="judge")
    reviews, failed = [], []
    prefix = LAYOUTS[bench.layout].rule_prefix
    for n, (q, answer, result) in enumerate(zip(bench.questions, answers, results)):
        review = {
            "id": n + 1,
            "question_id": q.question_id,
            "answer1_id": q.reference_id,
            "answer2_id": answer["answer_id"],
            "category": prefix + q.category,
            "content": result.text,
            "tuple": list(result.value) if result.ok else [-1, -1],  # LLaVA's mark of an unparsed review
        }
        if not result.ok:
            review["error"] = result.error
            failed.append({"question_id": q.question_id, "error": result.error, "reply": result.text})
        reviews.append(review)
    scores = summarize(bench, [r.value if r.ok else None for r in results])
    scores |= {
        "set": bench.layout,
        "n": len(bench.questions),
        "judged": len(bench.questions) - len(failed),
        "failed": failed,
        "judge": {"model": client.endpoint.model, "base_url": client.endpoint.base_url} | stats.as_dict(),
    }
    return reviews, scores, stats


def write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
