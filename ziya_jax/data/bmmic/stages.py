"""The LLM stages: generate, translate and rewrite. Each turns its input into items (one request each, in a fixed
order), keeps this shard's contiguous block of them, asks the endpoint through `ziya_jax.llm` (cached, so a rerun
resumes), and builds output records from the accepted replies; failed requests are counted, not written."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ziya_jax.data import formats
from ziya_jax.data.bmmic import prompting as P
from ziya_jax.data.bmmic.scenes import Scene
from ziya_jax.data.manifest import image_paths
from ziya_jax.llm import ChatRequest, LLMClient


@dataclasses.dataclass
class Item:
    id: str
    task: str  # generation type, rewriting scheme, or "translate"
    lang: str  # the prompt's language
    query: Any  # the prompt input: {captions, objects[, conversations]} or a list of texts
    source: Any  # what the output is built from (a scene, an input entry)
    image: str | None = None  # image path (relative to the image folder) sent with --send-images


@dataclasses.dataclass
class Settings:
    prompts: dict  # {task: {lang: Prompt}}
    examples: int | None = None  # in-context examples per request (None: all of the prompt's)
    seed: int = 0
    params: dict = dataclasses.field(default_factory=dict)  # sampling parameters of every request
    send_images: bool = False
    image_dir: str | None = None


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: want K/N, e.g. 0/4") from None
    if not 0 <= k < n:
        raise ValueError(f"--shard {text!r}: want 0 <= K < N")
    return k, n


def shard(items: Sequence, k: int, n: int) -> list:
    """The k-th of n contiguous blocks: shard outputs, concatenated in order, are the single run's output."""
    return list(items[len(items) * k // n : len(items) * (k + 1) // n])


def ask(
    client: LLMClient,
    stage: str,
    items: list[Item],
    settings: Settings,
    parse: Callable[[Item], Callable],
    progress: bool = True,
) -> tuple[list[tuple[Item, Any]], Any]:
    """-> ([(item, parsed reply)] of the accepted requests, in item order; the run's RunStats). parse(item) is the
    parse function of the item's reply."""
    for it in items:  # a missing prompt fails before anything is sent
        P.get(settings.prompts, it.task, it.lang)
    requests = Requests(stage, items, settings)
    results, stats = client.run(requests, parse=[parse(it) for it in items], desc=stage, progress=progress)
    return [(it, r.value) for it, r in zip(items, results) if r.ok], stats


class Requests(Sequence):
    """The items' requests, each built when indexed: with --send-images a job never holds every image at once."""

    def __init__(self, stage: str, items: list[Item], settings: Settings):
        self.stage, self.items, self.settings = stage, items, settings

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> ChatRequest:
        it, s = self.items[i], self.settings
        image = os.path.join(s.image_dir or ".", it.image) if s.send_images and it.image else None
        prompt = P.get(s.prompts, it.task, it.lang)
        messages = P.messages(self.stage, prompt, it.query, it.lang, it.id, s.examples, s.seed, image)
        return ChatRequest(messages, s.params)


def with_image(turns: list[dict], num_images: int) -> list[dict]:
    """The conversation with any <image> the LLM wrote removed and one per image before the first question."""
    turns = [{"from": t["from"], "value": t["value"].replace(formats.IMAGE, "").strip()} for t in turns]
    if num_images and turns:
        turns[0]["value"] = formats.IMAGE * num_images + "\n" + turns[0]["value"]
    return turns


def stem(path: str) -> str:
    return os.path.splitext(path)[0].replace("/", "_").replace("\\", "_")


# generate


def generate_items(scenes: Sequence[Scene], types: Sequence[str], langs: Sequence[str]) -> tuple[list[Item], int]:
    """Items for every scene with captions or boxes x type x language -> (items, scenes skipped as empty)."""
    items, empty = [], 0
    for s in scenes:
        if not s.captions and not s.boxes:
            empty += 1
            continue
        query = {"captions": s.captions, "objects": s.objects()}
        for task in types:
            for lang in langs:
                items.append(Item(f"{stem(s.image)}-{task}-{lang}", task, lang, query, s, s.image))
    return items, empty


def generated_record(item: Item, turns: list[dict]) -> dict:
    scene: Scene = item.source
    return {
        "id": item.id,
        "image": scene.image,
        "conversations": with_image(turns, 1),
        "lang": item.lang,
        "bmmic": {
            "stage": "generate",
            "type": item.task,
            "tags": scene.tags,
            "captions": scene.captions,
            "objects": scene.objects(),
        },
    }


# rewrite


def rewrite_items(entries: Sequence[dict], schemes: Sequence[str]) -> tuple[list[Item], Counter]:
    """Items for every usable entry x scheme -> (items, skipped entries by reason)."""
    items, skipped = [], Counter()
    for n, e in enumerate(entries):
        turns = e.get("conversations")
        if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns
        ):
            skipped["bad_entry"] += 1
            continue
        text = "\n".join(t["value"] for t in turns)
        lang = e.get("lang") or formats.detect_lang(text)
        query = {
            "conversations": [
                {"from": t.get("from"), "value": t["value"].replace(formats.IMAGE, "").strip()} for t in turns
            ]
        }
        meta = e.get("bmmic") if isinstance(e.get("bmmic"), dict) else {}
        for key in ("captions", "objects"):
            if key in meta:
                query[key] = meta[key]
        images = image_paths(e)
        for scheme in schemes:
            rec_id = str(e.get("id", n))
            items.append(Item(f"{rec_id}-{scheme}", scheme, lang, query, e, images[0] if images else None))
    return items, skipped


def rewritten_record(item: Item, turns: list[dict]) -> dict:
    entry = item.source
    meta = entry.get("bmmic") if isinstance(entry.get("bmmic"), dict) else {}
    images = image_paths(entry)
    record = {"id": item.id}
    if "image" in entry or "images" in entry:
        record["image"] = entry.get("image", entry.get("images"))
    record |= {
        "conversations": with_image(turns, len(images)),
        "lang": item.lang,
        "bmmic": {k: meta[k] for k in ("tags", "captions", "objects") if k in meta}
        | {"stage": "rewrite", "scheme": item.task, "source": str(entry.get("id", ""))},
    }
    return record
