"""Conversation readers: LLaVA-Instruct (already in the manifest's conversation schema), M3IT (instruction,
inputs, outputs and base64 images) and SVIT's original files."""

from __future__ import annotations

import base64
import binascii
import json
import os

from ziya_jax.data import errors
from ziya_jax.data.annotations import field, load_json
from ziya_jax.data.released import common
from ziya_jax.data.released.common import Skip


class _Line(str):
    """A JSON line not parsed yet: parsed inside the record's guard, so that a bad line is one skip."""


def _json_items(path: str) -> list:
    """A JSON list, or JSON lines (.jsonl), as (where, item) pairs."""
    if not path.endswith(".jsonl"):
        items = load_json(path)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(items).__name__}")
        return [(f"{os.path.basename(path)}[{n}]", item) for n, item in enumerate(items)]
    with open(path, encoding="utf-8") as f:
        return [(f"{os.path.basename(path)}:{n}", _Line(line)) for n, line in enumerate(f, 1) if line.strip()]


def _parsed(item):
    return json.loads(item) if isinstance(item, _Line) else item


def read_llava(ctx):
    """llava_instruct_150k.json, llava_v1_5_mix665k.json, ...: [{id, image, conversations: [{from: human|gpt,
    value}]}]; the image path (e.g. coco/train2017/000000033471.jpg in the mix) is kept, relative to --images."""
    for path in ctx.inputs:
        for where, item in common.progress(_json_items(path), path):
            yield from common.guarded(where, _llava, ctx, item, where)


def _llava(ctx, item, where: str):
    item = _parsed(item)
    paths = item.get("image")
    if not paths:
        yield Skip(common.NO_IMAGE, where, "a text-only conversation")
        return
    images = [ctx.image([p], where) for p in ([paths] if isinstance(paths, str) else paths)]
    skipped = next((i for i in images if isinstance(i, Skip)), None)
    conversations = field(item, "conversations", where, list)
    yield skipped or common.conversation(str(item.get("id", where)), images, conversations, where)


def read_m3it(ctx):
    """M3IT's data/TASK_GROUP/TASK/{train,val,test}.jsonl: lines {instruction, inputs, outputs, image_base64_str:
    [base64 images]}; the images are written to images/TASK_SPLIT/ beside the manifest; the human turn is the
    instruction then the inputs."""
    for path in ctx.inputs:
        task = os.path.basename(os.path.dirname(os.path.abspath(path)))
        folder = ctx.image_folder(f"{task}_{os.path.basename(path)}")
        for n, (where, line) in enumerate(common.progress(_json_items(path), path)):
            yield from common.guarded(where, _m3it, ctx, folder, n, line, where)


def _m3it(ctx, folder: str, n: int, item, where: str):
    item = _parsed(item)
    query = "\n".join(t.strip() for t in (field(item, "instruction", where, str), item.get("inputs") or "") if t)
    answer = field(item, "outputs", where, str)
    if not query.strip() or not answer.strip():
        yield Skip(common.EMPTY_TEXT, where, "instruction and inputs" if not query.strip() else "outputs")
        return
    encoded = item.get("image_base64_str") or []
    encoded = [encoded] if isinstance(encoded, str) else encoded
    if not encoded:
        yield Skip(common.NO_IMAGE, where, "no image_base64_str")
        return
    images = []
    for k, text in enumerate(encoded):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, TypeError) as e:
            yield Skip(errors.CORRUPT_IMAGE, where, f"image {k} is not base64: {e}")
            return
        image = ctx.write_image(folder, f"{n:08d}_{k}", data, where)
        if isinstance(image, Skip):
            yield image
            return
        images.append(image)
    messages = [{"from": "human", "value": query}, {"from": "gpt", "value": answer}]
    yield common.conversation(f"{os.path.basename(folder)}/{n}", images, messages, where)


_SVIT_ROLES = {"user": "human", "gpt": "gpt"}


def read_svit(ctx):
    """SVIT's data/{conversation,complex_reasoning,detail_description,referring_qa}.json: [{image_id (Visual
    Genome), conversations: [{content: [{from: user|gpt, value}]}]}]; one record per conversation, its image
    VG_100K/ID.jpg or VG_100K_2/ID.jpg. Referring QAs, whose <st>object<ed> boxes are in SVIT's own coordinates,
    are skipped (foreign_boxes); its LLaVA-format release reads with --format llava."""
    for path in ctx.inputs:
        for where, item in common.progress(_json_items(path), path):
            yield from common.guarded(where, _svit, ctx, item, where)


def _svit(ctx, item, where: str):
    item = _parsed(item)
    image_id = field(item, "image_id", where, (int, str))
    image = ctx.image([f"VG_100K/{image_id}.jpg", f"VG_100K_2/{image_id}.jpg", f"{image_id}.jpg"], where)
    for k, conv in enumerate(field(item, "conversations", where, list)):
        conv_where = f"{where}.conversations[{k}]"
        if isinstance(image, Skip):
            yield Skip(image.reason, conv_where, image.detail)
        else:
            yield from common.guarded(conv_where, _svit_conversation, image, f"{image_id}#{k}", conv, conv_where)


def _svit_conversation(image: str, rec_id: str, conv: dict, where: str):
    content = field(conv, "content", where, list)
    if any("<st>" in str(m.get("value")) for m in content):
        yield Skip(common.FOREIGN_BOXES, where, "<st>object<ed> [boxes] in SVIT's coordinates")
        return
    messages = [{"from": _SVIT_ROLES.get(m.get("from"), m.get("from")), "value": m.get("value")} for m in content]
    yield common.conversation(rec_id, [image], messages, where)
