"""Readers of the benchmarks' public annotation files, in the formats they are released in (nothing is
downloaded). Each reader takes `data` (the annotation file, or the folder holding it under its released name),
`image_dir` (default: the annotation file's folder) and a split, and checks that every image exists and lies
inside the image folder (no absolute paths, `..` or symlinks out of it) unless `allow_any_image_path`.

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
import os
from collections.abc import Sequence

from ziya_jax.data.annotations import coco_candidates, field, karpathy_image, load_json, tsv_caption
from ziya_jax.paths import inside


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


def _answers(record, where: str) -> list[str]:
    """The `answers` field of VQA and VizWiz: a list of {"answer": str, ...}."""
    return [field(a, "answer", where, str) for a in field(record, "answers", where, list)]


def _image_dir(image_dir: str | None, annotation: str) -> str:
    return image_dir or os.path.dirname(os.path.abspath(annotation))


def _resolve(image_dir: str, candidates: Sequence[str], item_id: str, allow_any_image_path: bool) -> str | None:
    for c in candidates:
        if not allow_any_image_path and not inside(image_dir, c):
            raise ValueError(
                f"image {c!r} of example {item_id} leads outside the image folder {image_dir}; "
                "pass --allow-any-image-path if the annotations are trusted"
            )
    return next((p for p in (os.path.join(image_dir, c) for c in candidates) if os.path.isfile(p)), None)


def check_images(items, image_dir: str, candidates, allow_any_image_path: bool = False) -> list:
    """Sets item.image to the first existing candidate path; all missing -> one error naming a few. A candidate
    leading out of image_dir is refused (unless allow_any_image_path) before it is looked up."""
    missing = []
    for item in items:
        path = _resolve(image_dir, candidates(item), item.id, allow_any_image_path)
        if path is None:
            missing.append(candidates(item)[0])
        else:
            item.image = path
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(items)} images are missing under {image_dir}, e.g. {missing[:3]}"
        )
    return items


def read_coco_captions(
    path: str, image_dir: str | None = None, allow_any_image_path: bool = False
) -> list[CaptionItem]:
    """COCO captions JSON ({images: [{id, file_name, ...}], annotations: [{image_id, caption}]}), e.g. NoCaps."""
    data = load_json(path)
    images = {field(img, "id", path, (int, str)): img for img in field(data, "images", path, list)}
    refs: dict = {}
    for ann in field(data, "annotations", path, list):
        refs.setdefault(field(ann, "image_id", path, (int, str)), []).append(field(ann, "caption", path, str))
    items = []
    for image_id, img in images.items():
        meta = {k: img[k] for k in ("domain",) if k in img}
        items.append(CaptionItem(str(image_id), field(img, "file_name", path, str), refs.get(image_id, []), meta))
    items = [it for it in items if it.references]
    return check_images(items, _image_dir(image_dir, path), lambda it: [it.image], allow_any_image_path)


def read_nocaps(
    data: str, image_dir: str | None = None, split: str = "val", allow_any_image_path: bool = False
) -> list[CaptionItem]:
    return read_coco_captions(_locate(data, [f"nocaps_{split}_4500_captions.json"]), image_dir, allow_any_image_path)


def read_karpathy(
    data: str, image_dir: str | None = None, split: str = "test", allow_any_image_path: bool = False
) -> list[CaptionItem]:
    """Karpathy's dataset_*.json: {images: [{filename, split, sentences: [{raw}], filepath?}]}."""
    path = _locate(data, ["dataset_flickr30k.json", "dataset_coco.json"])
    items = []
    for img in field(load_json(path), "images", path, list):
        if field(img, "split", path) != split:
            continue
        rel, refs = karpathy_image(img, path)
        items.append(CaptionItem(str(img.get("imgid", os.path.basename(rel))), rel, refs))
    if not items:
        raise ValueError(f"{path} has no images in split {split!r}")
    return check_images(
        items, _image_dir(image_dir, path), lambda it: [it.image, os.path.basename(it.image)], allow_any_image_path
    )


def read_tsv_captions(
    path: str, image_dir: str | None = None, keep: set[str] | None = None, allow_any_image_path: bool = False
) -> list[CaptionItem]:
    """`IMAGE#k<TAB>caption` lines (Flickr30k-CN/CNA, COCO-CN); IMAGE may carry .jpg; `keep` filters ids."""
    refs: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            image, caption = tsv_caption(line, f"{path}:{n}")
            if not caption:
                raise ValueError(f"{path}:{n}: expected IMAGE#k<TAB>caption, got {line.strip()[:60]!r}")
            if keep is None or image in keep:
                refs.setdefault(image, []).append(caption)
    if not refs:
        raise ValueError(f"{path} has no captions" + (" for the split's images" if keep is not None else ""))

    items = [CaptionItem(k, k, v) for k, v in refs.items()]
    return check_images(
        items, _image_dir(image_dir, path), lambda it: [*coco_candidates(f"{it.id}.jpg"), it.id], allow_any_image_path
    )


def read_flickr30k_cna(
    data: str, image_dir: str | None = None, split: str = "test", allow_any_image_path: bool = False
) -> list[CaptionItem]:
    return read_tsv_captions(
        _locate(data, [f"flickr30k_cn_{split}.txt", f"{split}.txt"]),
        image_dir,
        allow_any_image_path=allow_any_image_path,
    )


def read_coco_cn(
    data: str, image_dir: str | None = None, split: str = "test", allow_any_image_path: bool = False
) -> list[CaptionItem]:
    path = _locate(data, ["imageid.human-written-caption.txt"])
    split_file = os.path.join(os.path.dirname(path), f"coco-cn_{split}.txt")
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"COCO-CN split list {split_file} not found")
    with open(split_file, encoding="utf-8") as f:
        keep = {line.strip() for line in f if line.strip()}
    return read_tsv_captions(path, image_dir, keep, allow_any_image_path)


def read_captions(
    data: str, image_dir: str | None = None, split: str = "test", allow_any_image_path: bool = False
) -> list[CaptionItem]:
    """Any of the caption formats above, recognised by content (for retrieval on a chosen caption set)."""
    if os.path.isfile(data) and data.endswith(".txt"):
        return read_tsv_captions(data, image_dir, allow_any_image_path=allow_any_image_path)
    path = data if os.path.isfile(data) else None
    if path is None:
        for reader in (read_flickr30k_cna, read_coco_cn, read_karpathy):
            try:
                return reader(data, image_dir, split, allow_any_image_path=allow_any_image_path)
            except FileNotFoundError as e:
                if "holds none of" not in str(e):
                    raise
        raise FileNotFoundError(
            f"{data} holds no caption annotations (flickr30k_cn_{split}.txt, "
            f"imageid.human-written-caption.txt or dataset_*.json)"
        )
    content = load_json(path)
    if isinstance(content, dict) and "annotations" in content:
        return read_coco_captions(path, image_dir, allow_any_image_path)
    return read_karpathy(path, image_dir, split, allow_any_image_path)


def read_vqa(
    data: str,
    image_dir: str | None = None,
    split: str = "val2014",
    okvqa: bool = False,
    allow_any_image_path: bool = False,
) -> list[VQAItem]:
    """VQA v2 / OK-VQA: the questions file and the annotations file of one split."""
    prefix = "" if okvqa else "v2_"
    q_path = _locate(data, [f"{prefix}OpenEnded_mscoco_{split}_questions.json"])
    a_path = _locate(
        os.path.dirname(q_path) if os.path.isfile(data) else data, [f"{prefix}mscoco_{split}_annotations.json"]
    )
    questions = {
        field(q, "question_id", q_path, (int, str)): field(q, "question", q_path, str)
        for q in field(load_json(q_path), "questions", q_path, list)
    }
    items = []
    for ann in field(load_json(a_path), "annotations", a_path, list):
        qid = field(ann, "question_id", a_path, (int, str))
        if qid not in questions:
            raise ValueError(f"{a_path}: question {qid} is not in {q_path}")
        items.append(
            VQAItem(
                str(qid),
                str(field(ann, "image_id", a_path, int)),
                questions[qid],
                _answers(ann, a_path),
                {"answer_type": ann.get("answer_type", "")},
            )
        )

    return check_images(
        items,
        _image_dir(image_dir, q_path),
        lambda it: coco_candidates(f"COCO_{split}_{int(it.image):012d}.jpg"),
        allow_any_image_path,
    )


def read_gqa(
    data: str, image_dir: str | None = None, split: str = "testdev", allow_any_image_path: bool = False
) -> list[VQAItem]:
    path = _locate(data, [f"{split}_balanced_questions.json"])
    content = load_json(path)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected {{question_id: {{imageId, question, answer}}}}")
    items = [
        VQAItem(
            str(qid),
            field(q, "imageId", path, str),
            field(q, "question", path, str),
            [field(q, "answer", path, str)],
        )
        for qid, q in content.items()
    ]
    return check_images(
        items, _image_dir(image_dir, path), lambda it: [f"{it.image}.jpg", it.image], allow_any_image_path
    )


def read_scienceqa(
    data: str, image_dir: str | None = None, split: str = "test", allow_any_image_path: bool = False
) -> list[ChoiceItem]:
    """ScienceQA-IMG: the split's problems that have an image."""
    path = _locate(data, ["problems.json"])
    splits_path = os.path.join(os.path.dirname(path), "pid_splits.json")
    problems = load_json(path)
    if not isinstance(problems, dict):
        raise ValueError(f"{path}: expected {{problem id: {{question, choices, answer, image, ...}}}}")
    splits = load_json(splits_path) if os.path.isfile(splits_path) else {}
    if not isinstance(splits, dict) or split not in splits:
        raise FileNotFoundError(f"split {split!r} not found: need {splits_path} with that key")
    items = []
    for pid in field(splits, split, splits_path, list):
        p = problems.get(str(pid))
        if p is None:
            raise ValueError(f"{splits_path}: problem {pid} is not in {path}")
        where = f"{path}: problem {pid}"
        if not isinstance(p, dict):
            raise ValueError(f"{where} is {type(p).__name__}, want an object")
        if not p.get("image"):
            continue
        choices = field(p, "choices", where, list)
        answer = field(p, "answer", where, int)
        if not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer {answer} is not one of its {len(choices)} choices")
        items.append(
            ChoiceItem(
                str(pid),
                field(p, "image", where, str),
                field(p, "question", where, str),
                [str(c) for c in choices],
                answer,
                str(p.get("hint") or ""),
            )
        )
    root = image_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    return check_images(items, root, lambda it: [os.path.join(split, it.id, it.image)], allow_any_image_path)


def read_vizwiz(
    data: str, image_dir: str | None = None, split: str = "val", allow_any_image_path: bool = False
) -> list[VQAItem]:
    path = _locate(data, [f"{split}.json"])
    records = load_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of {{image, question, answers}}")
    items = []
    for n, r in enumerate(records):
        where = f"{path}: [{n}]"
        image = field(r, "image", where, str)
        meta = {"answer_type": r.get("answer_type", ""), "answerable": r.get("answerable")}
        items.append(VQAItem(image, image, field(r, "question", where, str), _answers(r, where), meta))
    return check_images(
        items, _image_dir(image_dir, path), lambda it: [it.image, os.path.join(split, it.image)], allow_any_image_path
    )
