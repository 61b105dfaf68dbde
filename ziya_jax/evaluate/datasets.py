"""Readers of the benchmarks' public annotation files, in the formats they are released in (nothing is
downloaded). Each reader takes `data` (the annotation file, or the folder holding it under its released name),
`image_dir` (default: the annotation file's folder) and a split, and checks that every image exists.

| task          | annotation file(s) (released names)                                   | image path                          |
|---------------|-----------------------------------------------------------------------|-------------------------------------|
| nocaps        | nocaps_{split}_4500_captions.json (COCO captions format)              | IMAGE_DIR/file_name                 |
| flickr30k     | dataset_flickr30k.json (Karpathy split; `split` selects images)       | IMAGE_DIR/filename                  |
| coco_cn       | imageid.human-written-caption.txt + coco-cn_{split}.txt (image ids)   | IMAGE_DIR/[train2014/|val2014/]ID.jpg |
| flickr30k_cna | flickr30k_cn_{split}.txt  (`IMAGE#k<TAB>caption` lines)               | IMAGE_DIR/IMAGE[.jpg]               |
| vqav2         | v2_OpenEnded_mscoco_{split}_questions.json + v2_mscoco_{split}_annotations.json | IMAGE_DIR/[split/]COCO_{split}_{id:012d}.jpg |
| okvqa         | OpenEnded_mscoco_{split}_questions.json + mscoco_{split}_annotations.json | as vqav2                       |
| gqa           | {split}_balanced_questions.json                                        | IMAGE_DIR/{imageId}.jpg             |
| scienceqa_img | problems.json + pid_splits.json (problems with an image only)          | IMAGE_DIR/{split}/{pid}/{image}     |
| vizwiz        | {split}.json (list of {image, question, answers, answerable, answer_type}) | IMAGE_DIR/[split/]image         |
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence


@dataclasses.dataclass
class CaptionItem:
    id: str
    image: str
    references: list[str]
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class VQAItem:
    id: str
    image: str
    question: str
    answers: list[str]  # annotators' answers (VQA: 10), or the one answer (GQA)
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ChoiceItem:
    id: str
    image: str
    question: str
    choices: list[str]
    answer: int
    context: str = ""


def _locate(data: str, names: Sequence[str]) -> str:
    """`data` itself if it is a file, else the first of `names` inside the folder `data`."""
    if os.path.isfile(data):
        return data
    if not os.path.isdir(data):
        raise FileNotFoundError(f"no annotation file or folder at {data}")
    for name in names:
        path = os.path.join(data, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{data} holds none of {list(names)}")


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _field(record, key: str, where: str):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    return record[key]


def _image_dir(image_dir: str | None, annotation: str) -> str:
    return image_dir or os.path.dirname(os.path.abspath(annotation))


def _resolve(image_dir: str, candidates: Sequence[str]) -> str | None:
    return next((p for p in (os.path.join(image_dir, c) for c in candidates) if os.path.isfile(p)), None)


def _check_images(items, image_dir: str, candidates) -> list:
    """Sets item.image to the first existing candidate path; all missing -> one error naming a few."""
    missing = []
    for item in items:
        path = _resolve(image_dir, candidates(item))
        if path is None:
            missing.append(candidates(item)[0])
        else:
            item.image = path
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(items)} images are missing under {image_dir}, e.g. "
                                f"{missing[:3]}")
    return items


def read_coco_captions(path: str, image_dir: str | None = None) -> list[CaptionItem]:
    """COCO captions JSON ({images: [{id, file_name, ...}], annotations: [{image_id, caption}]}), e.g. NoCaps."""
    data = _load_json(path)
    images = {img["id"]: img for img in _field(data, "images", path)}
    refs: dict = {}
    for ann in _field(data, "annotations", path):
        refs.setdefault(_field(ann, "image_id", path), []).append(_field(ann, "caption", path))
    items = []
    for image_id, img in images.items():
        meta = {k: img[k] for k in ("domain",) if k in img}
        items.append(CaptionItem(str(image_id), _field(img, "file_name", path), refs.get(image_id, []), meta))
    items = [it for it in items if it.references]
    return _check_images(items, _image_dir(image_dir, path), lambda it: [it.image])


def read_nocaps(data: str, image_dir: str | None = None, split: str = "val") -> list[CaptionItem]:
    return read_coco_captions(_locate(data, [f"nocaps_{split}_4500_captions.json"]), image_dir)


def read_karpathy(data: str, image_dir: str | None = None, split: str = "test") -> list[CaptionItem]:
    """Karpathy's dataset_*.json: {images: [{filename, split, sentences: [{raw}], filepath?}]}."""
    path = _locate(data, ["dataset_flickr30k.json", "dataset_coco.json"])
    items = []
    for img in _field(_load_json(path), "images", path):
        if _field(img, "split", path) != split:
            continue
        name = _field(img, "filename", path)
        rel = os.path.join(img["filepath"], name) if img.get("filepath") else name
        refs = [s["raw"] for s in _field(img, "sentences", path)]
        items.append(CaptionItem(str(img.get("imgid", name)), rel, refs))
    if not items:
        raise ValueError(f"{path} has no images in split {split!r}")
    return _check_images(items, _image_dir(image_dir, path), lambda it: [it.image, os.path.basename(it.image)])


def read_tsv_captions(path: str, image_dir: str | None = None, keep: set[str] | None = None) -> list[CaptionItem]:
    """`IMAGE#k<TAB>caption` lines (Flickr30k-CN/CNA, COCO-CN); IMAGE may carry .jpg; `keep` filters ids."""
    refs: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, tab, caption = line.rstrip("\n").partition("\t")
            if not tab or not caption.strip():
                raise ValueError(f"{path}:{n}: expected IMAGE#k<TAB>caption, got {line.strip()[:60]!r}")
            image = re.sub(r"\.jpg$", "", key.split("#")[0])
            if keep is None or image in keep:
                refs.setdefault(image, []).append(caption.strip())
    if not refs:
        raise ValueError(f"{path} has no captions" + (" for the split's images" if keep is not None else ""))

    def candidates(it):
        subset = it.id.split("_")[1] if it.id.startswith("COCO_") else ""
        return [f"{it.id}.jpg", os.path.join(subset, f"{it.id}.jpg"), it.id]

    items = [CaptionItem(k, k, v) for k, v in refs.items()]
    return _check_images(items, _image_dir(image_dir, path), candidates)


def read_flickr30k_cna(data: str, image_dir: str | None = None, split: str = "test") -> list[CaptionItem]:
    return read_tsv_captions(_locate(data, [f"flickr30k_cn_{split}.txt", f"{split}.txt"]), image_dir)


def read_coco_cn(data: str, image_dir: str | None = None, split: str = "test") -> list[CaptionItem]:
    path = _locate(data, ["imageid.human-written-caption.txt"])
    split_file = os.path.join(os.path.dirname(path), f"coco-cn_{split}.txt")
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"COCO-CN split list {split_file} not found")
    with open(split_file, encoding="utf-8") as f:
        keep = {line.strip() for line in f if line.strip()}
    return read_tsv_captions(path, image_dir, keep)


def read_captions(data: str, image_dir: str | None = None, split: str = "test") -> list[CaptionItem]:
    """Any of the caption formats above, recognised by content (for retrieval on a chosen caption set)."""
    if os.path.isfile(data) and data.endswith(".txt"):
        return read_tsv_captions(data, image_dir)
    path = data if os.path.isfile(data) else None
    if path is None:
        for reader in (read_flickr30k_cna, read_coco_cn, read_karpathy):
            try:
                return reader(data, image_dir, split)
            except FileNotFoundError as e:
                if "holds none of" not in str(e):
                    raise
        raise FileNotFoundError(f"{data} holds no caption annotations (flickr30k_cn_{split}.txt, "
                                f"imageid.human-written-caption.txt or dataset_*.json)")
    content = _load_json(path)
    if isinstance(content, dict) and "annotations" in content:
        return read_coco_captions(path, image_dir)
    return read_karpathy(path, image_dir, split)


def read_vqa(data: str, image_dir: str | None = None, split: str = "val2014", okvqa: bool = False) -> list[VQAItem]:
    """VQA v2 / OK-VQA: the questions file and the annotations file of one split."""
    prefix = "" if okvqa else "v2_"
    q_path = _locate(data, [f"{prefix}OpenEnded_mscoco_{split}_questions.json"])
    a_path = _locate(os.path.dirname(q_path) if os.path.isfile(data) else data,
                     [f"{prefix}mscoco_{split}_annotations.json"])
    questions = {q["question_id"]: q for q in _field(_load_json(q_path), "questions", q_path)}
    items = []
    for ann in _field(_load_json(a_path), "annotations", a_path):
        qid = _field(ann, "question_id", a_path)
        if qid not in questions:
            raise ValueError(f"{a_path}: question {qid} is not in {q_path}")
        answers = [a["answer"] for a in _field(ann, "answers", a_path)]
        items.append(VQAItem(str(qid), str(ann["image_id"]), questions[qid]["question"], answers,
                             {"answer_type": ann.get("answer_type", "")}))
    def candidates(it):
        name = f"COCO_{split}_{int(it.image):012d}.jpg"
        return [name, os.path.join(split, name)]

    return _check_images(items, _image_dir(image_dir, q_path), candidates)


def read_gqa(data: str, image_dir: str | None = None, split: str = "testdev") -> list[VQAItem]:
    path = _locate(data, [f"{split}_balanced_questions.json"])
    content = _load_json(path)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected {{question_id: {{imageId, question, answer}}}}")
    items = [VQAItem(str(qid), _field(q, "imageId", path), _field(q, "question", path), [_field(q, "answer", path)])
             for qid, q in content.items()]
    return _check_images(items, _image_dir(image_dir, path), lambda it: [f"{it.image}.jpg", it.image])


def read_scienceqa(data: str, image_dir: str | None = None, split: str = "test") -> list[ChoiceItem]:
    """ScienceQA-IMG: the split's problems that have an image."""
    path = _locate(data, ["problems.json"])
    splits_path = os.path.join(os.path.dirname(path), "pid_splits.json")
    problems = _load_json(path)
    pids = _load_json(splits_path).get(split) if os.path.isfile(splits_path) else None
    if pids is None:
        raise FileNotFoundError(f"split {split!r} not found: need {splits_path} with that key")
    items = []
    for pid in pids:
        p = problems.get(str(pid))
        if p is None:
            raise ValueError(f"{splits_path}: problem {pid} is not in {path}")
        if not p.get("image"):
            continue
        choices = _field(p, "choices", path)
        answer = _field(p, "answer", path)
        if not 0 <= answer < len(choices):
            raise ValueError(f"{path}: problem {pid} answer {answer} is not one of its {len(choices)} choices")
        items.append(ChoiceItem(str(pid), p["image"], _field(p, "question", path), list(choices), answer,
                                p.get("hint") or ""))
    root = image_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    return _check_images(items, root, lambda it: [os.path.join(split, it.id, it.image)])


def read_vizwiz(data: str, image_dir: str | None = None, split: str = "val") -> list[VQAItem]:
    path = _locate(data, [f"{split}.json"])
    records = _load_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of {{image, question, answers}}")
    items = []
    for r in records:
        answers = [a["answer"] for a in _field(r, "answers", path)]
        meta = {"answer_type": r.get("answer_type", ""), "answerable": r.get("answerable")}
        items.append(VQAItem(_field(r, "image", path), _field(r, "image", path), _field(r, "question", path),
                             answers, meta))
    return _check_images(items, _image_dir(image_dir, path), lambda it: [it.image, os.path.join(split, it.image)])
