"""VQA readers: VQAv2 and OK-VQA (a questions file joined with an annotations file by question_id), GQA, TextVQA
and OCR-VQA."""

from __future__ import annotations

import os
import re

from ziya_jax.data.annotations import coco_candidates, field, load_json
from ziya_jax.data.released import common
from ziya_jax.data.released.common import Skip


def read_vqa(ctx):
    """VQAv2 (v2_OpenEnded_mscoco_SPLIT_questions.json + v2_mscoco_SPLIT_annotations.json) and OK-VQA (the same
    names without v2_): {questions: [{image_id, question, question_id}]} and {annotations: [{question_id,
    multiple_choice_answer, answers: [{answer}]}]}. The answer is multiple_choice_answer, or where a release has
    none (OK-VQA) the answer its annotators gave most often. Several splits may be given at once."""
    questions, annotations = {}, []
    for path in ctx.inputs:
        content = load_json(path)
        if isinstance(content, dict) and "questions" in content:
            subset = content.get("data_subtype") or _subset_from_name(path)
            for n, q in enumerate(field(content, "questions", path, list)):
                questions[q.get("question_id") if isinstance(q, dict) else None] = (subset, q, f"{path}[{n}]")
        elif isinstance(content, dict) and "annotations" in content:
            annotations.append((path, field(content, "annotations", path, list)))
        else:
            raise ValueError(f"{path} is neither a VQA questions file ({{questions}}) nor an annotations file")
    if not questions or not annotations:
        raise ValueError("VQA wants a questions file and its annotations file (--input twice)")
    answered = set()
    for path, anns in annotations:
        for n, ann in enumerate(common.progress(anns, path)):
            where = f"{os.path.basename(path)}[{n}]"
            qid = ann.get("question_id") if isinstance(ann, dict) else None
            answered.add(qid)
            yield from common.guarded(where, _vqa, ctx, ann, questions.get(qid), where)
    for qid, (_, _, where) in questions.items():
        if qid not in answered:
            yield Skip(common.NO_JOIN_PARTNER, os.path.basename(where), f"question {qid} has no annotation")


def _subset_from_name(path: str) -> str:
    """The COCO image folder (train2014, val2014, ...) a VQA file names, for a file without data_subtype."""
    found = re.search(r"(train|val|test)(20\d\d)", os.path.basename(path))
    if not found:
        raise ValueError(f"{path} has no data_subtype and its name does not say its COCO split (e.g. train2014)")
    return found.group(0)


def _vqa(ctx, ann, question, where: str):
    if question is None:
        yield Skip(common.NO_JOIN_PARTNER, where, f"question {ann.get('question_id')} is in no questions file")
        return
    subset, q, _ = question
    answer = ann.get("multiple_choice_answer")
    if answer is None:
        answer = common.most_common([field(a, "answer", where, str) for a in field(ann, "answers", where, list)])
    image_id = field(q, "image_id", where, int)
    image = ctx.image(coco_candidates(f"COCO_{subset}_{image_id:012d}.jpg"), where)
    question_id = field(q, "question_id", where, (int, str))
    yield image if isinstance(image, Skip) else common.vqa(str(question_id), image, q.get("question"), answer, where)


def read_gqa(ctx):
    """GQA's {split}_balanced_questions.json (or train_all_questions/train_all_questions_N.json; a folder stands for
    its .json files): {question id: {imageId, question, answer, fullAnswer, ...}}; the answer is the short one."""
    for path in _json_files(ctx.inputs):
        content = load_json(path)
        if not isinstance(content, dict):
            raise ValueError(f"{path}: expected {{question id: {{imageId, question, answer}}}}")
        for qid, q in common.progress(content.items(), path, len(content)):
            where = f"{os.path.basename(path)}:{qid}"
            yield from common.guarded(where, _gqa, ctx, qid, q, where)


def _json_files(inputs) -> list[str]:
    paths = []
    for path in inputs:
        paths += (
            sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".json"))
            if os.path.isdir(path)
            else [path]
        )
    return paths


def _gqa(ctx, qid: str, q, where: str):
    image = ctx.image([f"{field(q, 'imageId', where, str)}.jpg"], where)
    yield image if isinstance(image, Skip) else common.vqa(qid, image, q.get("question"), q.get("answer"), where)


def read_textvqa(ctx):
    """TextVQA_0.5.1_{train,val}.json: {data: [{question_id, question, image_id, answers: [10 strings], set_name}]};
    images in train_images/ (train and val) and test_images/; the answer is the one given most often."""
    for path in ctx.inputs:
        data = field(load_json(path), "data", path, list)
        for n, item in enumerate(common.progress(data, path)):
            where = f"{os.path.basename(path)}:data[{n}]"
            yield from common.guarded(where, _textvqa, ctx, item, where)


def _textvqa(ctx, item, where: str):
    image_id = field(item, "image_id", where, str)
    folder = "test_images" if item.get("set_name") == "test" else "train_images"
    image = ctx.image([f"{image_id}.jpg", f"{folder}/{image_id}.jpg"], where)
    answers = [common.clean(a) for a in item.get("answers") or []]
    answer = common.most_common([a for a in answers if a])
    question_id = item.get("question_id", where)
    yield image if isinstance(image, Skip) else common.vqa(str(question_id), image, item.get("question"), answer, where)


OCR_VQA_SPLITS = {1: "train", 2: "val", 3: "test"}  # dataset.json's split codes


def read_ocr_vqa(ctx):
    """OCR-VQA's dataset.json: {book id: {imageURL, questions: [...], answers: [...], split: 1|2|3, ...}}; its
    loadDataset.py saves the covers as images/ID.EXT (EXT from imageURL); one record per question."""
    for path in ctx.inputs:
        content = load_json(path)
        if not isinstance(content, dict):
            raise ValueError(f"{path}: expected {{book id: {{imageURL, questions, answers, split}}}}")
        for key, item in common.progress(content.items(), path, len(content)):
            where = f"{os.path.basename(path)}:{key}"
            yield from common.guarded(where, _ocr_vqa, ctx, key, item, where)


def _ocr_vqa(ctx, key: str, item, where: str):
    split = OCR_VQA_SPLITS.get(field(item, "split", where, int))
    if split != ctx.split:
        yield Skip(common.OTHER_SPLIT if split else common.UNKNOWN_SPLIT, where, f"split {item['split']}")
        return
    questions, answers = field(item, "questions", where, list), field(item, "answers", where, list)
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions, {len(answers)} answers")
    name = key + (os.path.splitext(field(item, "imageURL", where, str))[1] or ".jpg")
    image = ctx.image([name, f"images/{name}"], where)
    if isinstance(image, Skip):
        yield image
        return
    for k, (question, answer) in enumerate(zip(questions, answers)):
        yield common.vqa(f"{key}#{k}", image, question, answer, f"{where}.questions[{k}]")
