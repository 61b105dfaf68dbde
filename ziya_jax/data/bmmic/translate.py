"""Translation into Chinese of English instruction data, read and written in the layouts the data is released in:

- llava: a LLaVA-Instruct JSON list (or JSONL) of {id, image, conversations} -> the same, every value
  translated and "lang": "zh" added (--out: a file).
- m3it: M3IT JSON lines of {instruction, inputs, outputs, image_base64_str} -> the same, the three texts
  translated (--out: a file).
- vqav2: v2_OpenEnded_mscoco_{split}_questions.json and v2_mscoco_{split}_annotations.json -> both files under
  the same names in the folder --out, question ids kept: VQAv2 (T), read by `python -m ziya_jax.evaluate --task
  vqav2 --lang zh --data OUT`.
- gqa: {split}_balanced_questions.json -> the same name in the folder --out, question ids kept: GQA (T).

One request per conversation or question: the texts to translate as a JSON list (a VQA question with its distinct
answers, so that they are translated together), answered by a list of as many translations. A question whose
translation failed is left out of every output file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ziya_jax.data.annotations import load_json
from ziya_jax.data.bmmic.stages import Item
from ziya_jax.data.manifest import read_manifest

FORMATS = ("llava", "m3it", "vqav2", "gqa")
M3IT_TEXTS = ("instruction", "inputs", "outputs")


def _vqa_paths(data: str, split: str) -> tuple[str, str]:
    folder = data if os.path.isdir(data) else os.path.dirname(data)
    questions = data if os.path.isfile(data) else os.path.join(folder, f"v2_OpenEnded_mscoco_{split}_questions.json")
    annotations = os.path.join(
        folder, os.path.basename(questions).replace("OpenEnded_", "").replace("_questions.json", "_annotations.json")
    )
    for path in (questions, annotations):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found")
    return questions, annotations


def _gqa_path(data: str, split: str) -> str:
    path = data if os.path.isfile(data) else os.path.join(data, f"{split}_balanced_questions.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    return path


class Job:
    """The items of one input, and how to write their translations in the input's layout."""

    def __init__(self, fmt: str, data: str, split: str | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}; known: {list(FORMATS)}")
        self.fmt, self.data = fmt, data
        self.skipped = 0  # input entries with nothing to translate or a broken shape
        self.items = getattr(self, f"_read_{fmt}")(split)

    def _read_llava(self, split) -> list[Item]:
        entries, invalid = read_manifest(self.data)
        self.skipped += len(invalid)
        items = []
        for n, e in enumerate(entries):
            turns = e.get("conversations")
            if (
                not isinstance(turns, list)
                or not turns
                or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)
            ):
                self.skipped += 1
                continue
            entry = {k: v for k, v in e.items() if k != "_where"}
            items.append(Item(str(e.get("id", n)), "translate", "zh", [t["value"] for t in turns], entry))
        return items

    def _read_m3it(self, split) -> list[Item]:
        entries, invalid = read_manifest(self.data)
        self.skipped += len(invalid)
        items = []
        for n, e in enumerate(entries):
            fields = [k for k in M3IT_TEXTS if isinstance(e.get(k), str) and e[k].strip()]
            if not fields:
                self.skipped += 1
                continue
            entry = {k: v for k, v in e.items() if k != "_where"}
            items.append(Item(f"{n}", "translate", "zh", [e[k] for k in fields], (entry, fields)))
        return items

    def _read_vqav2(self, split) -> list[Item]:
        q_path, a_path = _vqa_paths(self.data, split or "val2014")
        self.files = {"questions": (q_path, load_json(q_path)), "annotations": (a_path, load_json(a_path))}
        annotations = {a["question_id"]: a for a in self.files["annotations"][1]["annotations"]}
        items = []
        for q in self.files["questions"][1]["questions"]:
            ann = annotations.get(q["question_id"])
            if ann is None:
                self.skipped += 1
                continue
            answers = list(
                dict.fromkeys([a["answer"] for a in ann.get("answers", [])] + [ann.get("multiple_choice_answer", "")])
            )
            answers = [a for a in answers if a]
            items.append(Item(str(q["question_id"]), "translate", "zh", [q["question"], *answers], (q, ann, answers)))
        return items

    def _read_gqa(self, split) -> list[Item]:
        path = _gqa_path(self.data, split or "testdev")
        self.files = {"questions": (path, load_json(path))}
        items = []
        for qid, q in self.files["questions"][1].items():
            fields = [k for k in ("question", "answer", "fullAnswer") if isinstance(q.get(k), str) and q[k]]
            items.append(Item(str(qid), "translate", "zh", [q[k] for k in fields], (q, fields)))
        return items

    def records(self, done: Sequence[tuple[Item, list[str]]]) -> list[dict]:
        """llava and m3it: the translated entries, in input order."""
        out = []
        for item, texts in done:
            if self.fmt == "llava":
                turns = [t | {"value": v} for t, v in zip(item.source["conversations"], texts)]
                out.append(item.source | {"conversations": turns, "lang": "zh"})
            else:
                entry, fields = item.source
                out.append(entry | dict(zip(fields, texts)))
        return out

    def layout(self, done: Sequence[tuple[Item, list[str]]]) -> dict[str, object]:
        """vqav2 and gqa: {file name: content} of the translated files (only translated questions)."""
        if self.fmt == "gqa":
            path, _ = self.files["questions"]
            content = {}
            for item, texts in done:
                q, fields = item.source
                content[item.id] = q | dict(zip(fields, texts))
            return {os.path.basename(path): content}
        (q_path, q_file), (a_path, a_file) = self.files["questions"], self.files["annotations"]
        questions, annotations = [], []
        for item, texts in done:
            q, ann, answers = item.source
            zh = dict(zip(answers, texts[1:]))
            questions.append(q | {"question": texts[0]})
            annotations.append(
                ann
                | {
                    "answers": [a | {"answer": zh.get(a["answer"], a["answer"])} for a in ann.get("answers", [])],
                    "multiple_choice_answer": zh.get(ann.get("multiple_choice_answer"), ""),
                }
            )
        return {
            os.path.basename(q_path): q_file | {"questions": questions},
            os.path.basename(a_path): a_file | {"annotations": annotations},
        }
