"""Prompt files: a system message and in-context examples per task and language, as data (the `prompts/` folder
of this package, or a file of one's own with the same shape):

    {TASK: {LANG: {"system": "...", "examples": [{"input": ..., "output": ...}, ...]}}}

generate.json (the seed file): TASK is conversation, detail or complex_reasoning; an input is {"captions":
[str], "objects": [{"label": str, "box": [x1,y1,x2,y2] in 0..999}]}; an output is the conversation,
[{"from": "human", "value": str}, {"from": "gpt", "value": str}, ...].
translate.json: TASK is translate, LANG the target language; input and output are lists of strings of the same
length. rewrite.json: TASK is a rewriting scheme; an input is {"conversations": [...]} with optional "captions"
and "objects"; an output is the rewritten conversation.

A request is the system message, the examples as user/assistant turns (inputs rendered as the query is,
outputs as JSON) and the query; the LLM answers in the outputs' JSON.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import mimetypes
import random
import re
from importlib import resources

from ziya_jax.llm import as_messages

TYPES = ("conversation", "detail", "complex_reasoning")
SCHEMES = ("deepening", "concretizing", "increasing_reasoning", "adding_constraints")
STAGE_TASKS = {"generate": TYPES, "translate": ("translate",), "rewrite": SCHEMES}

_HEADERS = {
    "en": ("Captions:", "Objects (label: box [x1,y1,x2,y2], coordinates scaled to 0-999):", "Conversation:", "(none)"),
    "zh": ("图片描述：", "物体（标签：边界框 [x1,y1,x2,y2]，坐标缩放到 0-999）：", "对话：", "（无）"),
}
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


@dataclasses.dataclass(frozen=True)
class Prompt:
    system: str
    examples: tuple[dict, ...]


def default_path(stage: str) -> str:
    return str(resources.files(__package__) / "prompts" / f"{stage}.json")


def load(stage: str, path: str | None = None) -> dict[str, dict[str, Prompt]]:
    """The prompt file of a stage (default: the package's) -> {task: {lang: Prompt}}, its shape checked."""
    path = path or default_path(stage)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    prompts = {}
    for task, langs in data.items() if isinstance(data, dict) else ():
        if task not in STAGE_TASKS[stage]:
            raise ValueError(f"{path}: task {task!r}; a {stage} file has {list(STAGE_TASKS[stage])}")
        for lang, p in langs.items():
            where = f"{path}: {task}.{lang}"
            if not isinstance(p, dict) or not isinstance(p.get("system"), str):
                raise ValueError(f"{where} needs a 'system' string")
            examples = p.get("examples", [])
            if not isinstance(examples, list) or not all(
                isinstance(e, dict) and {"input", "output"} <= e.keys() for e in examples
            ):
                raise ValueError(f"{where}: 'examples' must be a list of {{input, output}}")
            prompts.setdefault(task, {})[lang] = Prompt(p["system"], tuple(examples))
    if not prompts:
        raise ValueError(f"{path} holds no prompts ({{task: {{lang: {{system, examples}}}}}})")
    return prompts


def get(prompts: dict, task: str, lang: str) -> Prompt:
    try:
        return prompts[task][lang]
    except KeyError:
        raise ValueError(f"no prompt for {task!r} in {lang!r}; the prompt file has {sorted(prompts)}") from None


def render_context(inp: dict, lang: str) -> str:
    """Captions and objects (and a conversation, for rewriting) as the text of a user message."""
    captions, objects, conversation, none = _HEADERS[lang]
    parts = []
    if "captions" in inp or "objects" in inp:
        lines = [f"- {c}" for c in inp.get("captions", [])] or [none]
        parts.append("\n".join([captions, *lines]))
        lines = [f"- {o['label']}: [{','.join(str(v) for v in o['box'])}]" for o in inp.get("objects", [])] or [none]
        parts.append("\n".join([objects, *lines]))
    if "conversations" in inp:
        parts.append(f"{conversation}\n{dump(inp['conversations'])}")
    return "\n\n".join(parts)


def render_input(stage: str, inp, lang: str) -> str:
    return dump(inp) if stage == "translate" else render_context(inp, lang)


def dump(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def image_part(path: str) -> dict:
    """An image file as an OpenAI `image_url` content part with a data: URI."""
    mime = mimetypes.guess_type(path)[0] or "image/jpeg"
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def messages(
    stage: str, prompt: Prompt, query, lang: str, item_id: str, examples: int | None, seed: int, image: str | None
) -> list[dict]:
    """The request for one item: `examples` in-context examples (all when None) drawn by (seed, item_id), so
    that a request does not depend on which other items run beside it; with `image`, the image goes first in
    the query."""
    chosen = list(prompt.examples)
    if examples is not None and examples < len(chosen):
        chosen = random.Random(f"{seed}:{item_id}").sample(chosen, examples)
    shots = [(render_input(stage, e["input"], lang), dump(e["output"])) for e in chosen]
    text = render_input(stage, query, lang)
    return as_messages(prompt.system, shots, [image_part(image), {"type": "text", "text": text}] if image else text)


def _json_reply(text: str):
    fenced = _FENCE.match(text)
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None


def parse_turns(text: str) -> list[dict]:
    """A reply that is a JSON list of {from, value} turns (optionally in a ```json fence); whether the roles
    alternate is the filter's business."""
    turns = _json_reply(text)
    if not isinstance(turns, list) or not turns:
        raise ValueError("not a non-empty JSON list")
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise ValueError(f"turn {t!r:.60} is not {{from, value}} strings")
    return [{"from": t["from"], "value": t["value"]} for t in turns]


def texts_parser(n: int):
    """Parses a reply that is a JSON list of n strings (a translation)."""

    def parse(text: str) -> list[str]:
        texts = _json_reply(text)
        if not isinstance(texts, list) or len(texts) != n or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"not a JSON list of {n} strings")
        return texts

    return parse
