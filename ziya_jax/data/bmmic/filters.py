"""Rule-based filtering of instruction records (LLaVA "conversations" entries). Each record is checked by the
rules in order and rejected for the first that fails; every rejection is counted by reason:

| reason             | rejects                                                                                |
|--------------------|----------------------------------------------------------------------------------------|
| bad_json           | a line that is not a JSON object; "conversations" not a list of {from, value} strings  |
| bad_roles          | turns that do not alternate human, gpt, ... starting with human and ending with gpt    |
| empty_turn         | a turn with no text besides <image>                                                     |
| overlong_turn      | a turn longer than max_turn_chars characters                                            |
| image_placeholder  | <image> in the human turns not once per image of the record, or <image> in an answer    |
| wrong_language     | Chinese ("lang": "zh") whose CJK share of letters is under min_cjk_share; English with   |
|                    | a CJK share over max_cjk_share_en                                                        |
| english_in_chinese | Chinese with a run of more than max_english_run English words                            |
| refusal            | refusals and apologies, English or Chinese ("I'm sorry", "as an AI", "抱歉", "我无法...") |
| bad_box            | a [x1,y1,x2,y2] that is not four integers 0..999 with x1 <= x2 and y1 <= y2               |
| absent_object      | (records with "bmmic": {"tags"}) an answer naming a known object that is neither among   |
|                    | the record's tags nor in its captions                                                     |
| duplicate          | the same images and the same conversation as a record kept before                        |
| near_duplicate     | the same images and a conversation whose character 3-grams overlap a kept one's by at   |
|                    | least near_duplicate (Jaccard)                                                            |

A record's language is its "lang" field, else Chinese when it has any CJK character. Known objects are the
COCO categories of `object_names.json` (with English synonyms and Chinese names) and every tag in the input.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from importlib import resources

from ziya_jax.data import formats
from ziya_jax.data.manifest import image_paths

REASONS = (
    "bad_json",
    "bad_roles",
    "empty_turn",
    "overlong_turn",
    "image_placeholder",
    "wrong_language",
    "english_in_chinese",
    "refusal",
    "bad_box",
    "absent_object",
    "duplicate",
    "near_duplicate",
)

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_ENGLISH_RUN = re.compile(r"[A-Za-z]+(?:[\s,'’-]+[A-Za-z]+)*")
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_LIKE = re.compile(rf"\[{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}\]")
_REFUSAL = re.compile(
    r"\b(?:I'?m sorry|I am sorry|I apologi[sz]e|as an AI\b|as a language model|"
    r"I (?:cannot|can't|can not|am unable to|'m unable to|am not able to) (?:see|view|access|determine|tell|"
    r"provide|help|answer|identify))"
    r"|抱歉|对不起|作为(?:一个)?(?:AI|人工智能|语言模型)|我(?:无法|不能|没办法)(?:看到|查看|访问|确定|判断|提供|回答|识别)",
    re.I,
)


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    max_turn_chars: int = 4000
    min_cjk_share: float = 0.5  # of the letters (CJK and Latin) of Chinese text
    max_cjk_share_en: float = 0.1
    max_english_run: int = 3  # words; brand names and short terms stay allowed
    near_duplicate: float = 0.9


def load_object_names(extra: Mapping[str, Mapping] | None = None) -> dict[str, dict[str, list[str]]]:
    """{label: {"en": [names], "zh": [names]}}: the package's COCO names, updated with `extra`."""
    with (resources.files(__package__) / "object_names.json").open(encoding="utf-8") as f:
        names = json.load(f)
    for label, langs in (extra or {}).items():
        names[label] = {"en": [label, *langs.get("en", [])], "zh": list(langs.get("zh", []))}
    return names


@dataclasses.dataclass
class Rejection:
    reason: str
    detail: str
    where: str
    record: dict


def _strip_image(text: str) -> str:
    return text.replace(formats.IMAGE, "")


def _roles_ok(turns: list[dict]) -> bool:
    roles = [t["from"] for t in turns]
    return len(roles) % 2 == 0 and all(
        r in (("human", "user") if i % 2 == 0 else ("gpt", "assistant", "bot")) for i, r in enumerate(roles)
    )


def _boxes_ok(text: str) -> str | None:
    for m in _BOX_LIKE.finditer(text):
        values = m.groups()
        if any("." in v for v in values):
            return f"{m.group(0)} is not integers"
        x1, y1, x2, y2 = (int(v) for v in values)
        if not all(0 <= v < formats.BOX_BINS for v in (x1, y1, x2, y2)) or x1 > x2 or y1 > y2:
            return f"{m.group(0)} is not ordered integers 0..{formats.BOX_BINS - 1}"
    return None


class _Objects:
    """Finds answers naming objects absent from a record's tags and captions: one alternation of every known
    name, longest first, so that "hot dog" is one mention and not also a "dog"."""

    def __init__(self, names: dict, tags: Iterable[str]):
        self.groups = {label: g["en"] + g["zh"] for label, g in names.items()}
        for tag in tags:
            self.groups.setdefault(tag, [tag])
        every = sorted({n.lower() for g in self.groups.values() for n in g}, key=len, reverse=True)
        alternation = "|".join(re.escape(n) for n in every)
        self.pattern = re.compile(rf"(?<![A-Za-z])({alternation})(?:es|s)?", re.I)

    def mentions(self, text: str) -> set[str]:
        found = set()
        for m in self.pattern.finditer(text):  # an English name must end a word (after an optional plural)
            name = m.group(1).lower()
            if _CJK.search(name) or not re.match(r"[A-Za-z]", text[m.end() : m.end() + 1]):
                found.add(name)
        return found

    def absent(self, text: str, tags: list[str], captions: list[str]) -> str | None:
        present = {n.lower() for t in tags for n in self.groups.get(t, [t])} | self.mentions(" ".join(captions))
        return next(iter(sorted(self.mentions(text) - present)), None)


def _language(turns: list[dict], lang: str, cfg: FilterConfig) -> tuple[str, str] | None:
    text = _BOX_LIKE.sub(" ", " ".join(_strip_image(t["value"]) for t in turns))
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    share = cjk / max(1, cjk + latin)
    if lang == "zh":
        if share < cfg.min_cjk_share:
            return "wrong_language", f"CJK share {share:.2f} < {cfg.min_cjk_share}"
        for run in _ENGLISH_RUN.findall(text):
            if len(re.findall(r"[A-Za-z]+", run)) > cfg.max_english_run:
                return "english_in_chinese", f"{run!r:.80}"
    elif share > cfg.max_cjk_share_en:
        return "wrong_language", f"CJK share {share:.2f} > {cfg.max_cjk_share_en} in English"
    return None


def check(entry: Mapping, cfg: FilterConfig, objects: _Objects) -> tuple[str, str] | None:
    """(reason, detail) of the first rule an entry fails, or None. Duplicates are `filter_entries`' business."""
    turns = entry.get("conversations")
    if (
        not isinstance(turns, list)
        or not turns
        or not all(
            isinstance(t, Mapping) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in turns
        )
    ):
        return "bad_json", "'conversations' is not a non-empty list of {from, value} strings"
    if not _roles_ok(turns):
        return "bad_roles", f"roles {[t['from'] for t in turns]}"
    for i, t in enumerate(turns):
        if not _strip_image(t["value"]).strip():
            return "empty_turn", f"turn {i}"
        if len(t["value"]) > cfg.max_turn_chars:
            return "overlong_turn", f"turn {i}: {len(t['value'])} > {cfg.max_turn_chars} characters"
    placed = sum(t["value"].count(formats.IMAGE) for t in turns[0::2])
    in_answers = sum(t["value"].count(formats.IMAGE) for t in turns[1::2])
    if placed != len(image_paths(entry)) or in_answers:
        return "image_placeholder", f"{placed} in questions, {in_answers} in answers, {len(image_paths(entry))} images"
    text = "\n".join(t["value"] for t in turns)
    lang = entry.get("lang") or formats.detect_lang(text)
    bad = _language(turns, lang, cfg)
    if bad:
        return bad
    refusal = _REFUSAL.search(text)
    if refusal:
        return "refusal", refusal.group(0)
    bad_box = _boxes_ok(text)
    if bad_box:
        return "bad_box", bad_box
    meta = entry.get("bmmic")
    if isinstance(meta, Mapping) and isinstance(meta.get("tags"), list):
        answers = "\n".join(t["value"] for t in turns[1::2])
        name = objects.absent(answers, meta["tags"], meta.get("captions", []))
        if name:
            return "absent_object", f"{name!r} is not among the tags {meta['tags']}"
    return None


def _normalized(turns: list[dict]) -> str:
    return "\n".join(" ".join(t["value"].lower().split()) for t in turns)


def _trigrams(text: str) -> set[str]:
    return {text[i : i + 3] for i in range(max(1, len(text) - 2))}


def filter_entries(
    entries: list[dict], invalid: Mapping[str, str], cfg: FilterConfig, object_names: dict
) -> tuple[list[dict], list[Rejection], Counter]:
    """-> (kept entries in order, rejections, counts by reason). `invalid`: {where: why} of lines that were not
    JSON objects (counted as bad_json). Near duplicates are looked for among records of the same images only:
    a plain pairwise comparison, since those groups are small."""
    tags = {t for e in entries if isinstance(e.get("bmmic"), Mapping) for t in e["bmmic"].get("tags") or []}
    objects = _Objects(object_names, tags)
    rejected = [Rejection("bad_json", why, where, {}) for where, why in invalid.items()]
    kept, seen, by_image = [], set(), defaultdict(list)
    for entry in entries:
        where = entry.get("_where", "?")
        record = {k: v for k, v in entry.items() if k != "_where"}
        bad = check(record, cfg, objects)
        if bad is None:
            images = tuple(str(p) for p in image_paths(record))
            text = _normalized(record["conversations"])
            grams = _trigrams(text)
            if (images, text) in seen:
                bad = "duplicate", "the same images and conversation as a record before"
            else:
                for other in by_image[images]:
                    overlap = len(grams & other) / len(grams | other)
                    if overlap >= cfg.near_duplicate:
                        bad = "near_duplicate", f"3-gram overlap {overlap:.2f} with a record before"
                        break
            if bad is None:
                seen.add((images, text))
                by_image[images].append(grams)
                kept.append(record)
                continue
        rejected.append(Rejection(*bad, where, record))
    return kept, rejected, Counter(r.reason for r in rejected)
