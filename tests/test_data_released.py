"""Readers of the public data sets' released files (ziya_jax.data.released), each on small hand-made files laid out
as the released ones, with a record of each kind the reader must skip; the CLI as a subprocess, its manifest read
back through ManifestSource and formats."""

import base64
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ziya_jax.data import formats, released
from ziya_jax.data.__main__ import main
from ziya_jax.data.manifest import ManifestSource
from ziya_jax.data.released.common import load_plain_pickle


def image_bytes(kind: str = "JPEG", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, kind)
    return buf.getvalue()


def put_images(root, *paths) -> str:
    for rel in paths:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(image_bytes())
    return str(root)


def write_json(path, content) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, ensure_ascii=False)
    return str(path)


def run(name, inputs, out, **kwargs):
    """-> (records written, skip counts by reason)."""
    report = released.convert(name, [str(p) for p in inputs], str(out), **kwargs)
    with open(out, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert report.written.total() == len(records)
    return records, dict(report.skipped)


def test_img2dataset_tar_shards(tmp_path):
    def shard(path, members):
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    def meta(**fields):
        return json.dumps({"url": "http://x/a.jpg", "key": "k", "status": "success", **fields}).encode()

    shard(
        tmp_path / "00000.tar",
        [
            ("000000000.jpg", image_bytes()),
            ("000000000.txt", b"  a red\nsquare "),
            ("000000000.json", meta(caption="a red square")),
            ("000000001.txt", b"no image here"),  # no_image
            ("000000001.json", meta()),
            ("000000002.jpg", image_bytes()),
            ("000000002.txt", b"   "),  # empty_text
            ("000000003.jpg", b"not an image at all"),  # corrupt_image
            ("000000003.txt", b"broken bytes"),
            ("000000004.jpg", image_bytes()),
            ("000000004.txt", b"fetch failed"),
            ("000000004.json", meta(status="failed_to_download", error_message="timeout")),  # download_failed
            ("000000005.png", image_bytes("PNG")),  # the caption only in the json
            ("000000005.json", meta(caption="a png")),
        ],
    )
    shard(tmp_path / "00001.tar", [("000010000.jpg", image_bytes()), ("000010000.txt", b"second shard")])
    (tmp_path / "00002.tar").write_bytes((tmp_path / "00001.tar").read_bytes()[:700])  # cut in its first member
    out = tmp_path / "out" / "pairs.jsonl"
    records, skipped = run(
        "img2dataset-tar", [tmp_path / "00000.tar", tmp_path / "00001.tar", tmp_path / "00002.tar"], out
    )
    assert [(r["id"], r["caption"]) for r in records] == [
        ("00000/000000000", "a red square"),
        ("00000/000000005", "a png"),
        ("00001/000010000", "second shard"),
    ]
    assert [r["image"] for r in records] == [
        "images/00000/000000000.jpg",
        "images/00000/000000005.png",
        "images/00001/000000000.jpg",
    ]
    assert skipped == {"no_image": 1, "empty_text": 1, "corrupt_image": 1, "download_failed": 1, "truncated_file": 1}
    source = ManifestSource(out)
    assert [Path(p).read_bytes() for p in source[1]["images"]] == [image_bytes("PNG")]


def test_img2dataset_parquet(tmp_path):
    rows = {
        "key": ["000000000", "000000001", "000000002", "000000003"],
        "jpg": [image_bytes(), None, image_bytes(), b"\x00" * 10],
        "txt": ["a dog on grass", None, "", "bad bytes"],
        "url": ["http://x/0.jpg", "http://x/1.jpg", "http://x/2.jpg", "http://x/3.jpg"],
        "status": ["success", "failed_to_download", "success", "success"],
        "error_message": [None, "404", None, None],
        "width": [8, None, 8, 8],
    }
    pq.write_table(pa.table(rows), tmp_path / "00000.parquet")
    (tmp_path / "meta").mkdir()
    meta_only = {k: rows[k] for k in ("key", "url", "status", "error_message", "width")}  # beside tar shards
    pq.write_table(pa.table({**meta_only, "caption": ["a", "b", "c", "d"]}), tmp_path / "meta" / "00000.parquet")
    out = tmp_path / "parquet.jsonl"
    records, skipped = run("img2dataset-parquet", [tmp_path / "00000.parquet", tmp_path / "meta"], out)
    assert [(r["id"], r["image"], r["caption"]) for r in records] == [
        ("00000/000000000", "images/00000/000000000.jpg", "a dog on grass")
    ]
    # the metadata file's rows: 3 fetched but carrying no image, 1 failed
    assert skipped == {"download_failed": 2, "empty_text": 1, "corrupt_image": 1, "no_image": 3}
    assert (tmp_path / records[0]["image"]).read_bytes() == image_bytes()


def test_karpathy_coco_and_flickr30k(tmp_path):
    def img(split, filename, *raws, filepath="train2014", cocoid=0):
        return {
            "filepath": filepath,
            "sentids": [],
            "filename": filename,
            "imgid": cocoid,
            "split": split,
            "sentences": [{"tokens": r.lower().split(), "raw": r, "imgid": cocoid, "sentid": 0} for r in raws],
            "cocoid": cocoid,
        }

    name = "COCO_train2014_{:012d}.jpg".format
    coco = {
        "dataset": "coco",
        "images": [
            img("train", name(9), "A plate of food.", "  ", "Food on a table.", cocoid=9),  # one empty sentence
            img("restval", "COCO_val2014_000000000042.jpg", "A dog.", filepath="val2014", cocoid=42),
            img("val", name(1), "Val image.", cocoid=1),  # other_split
            img("test", name(2), "Test image.", cocoid=2),  # other_split
            img("extra", name(3), "Odd split.", cocoid=3),  # unknown_split
            img("train", name(4), "Its file is missing.", cocoid=4),  # missing_image
            {"split": "train", "sentences": [{"raw": "no filename"}]},  # malformed
        ],
    }
    flickr = {"dataset": "flickr30k", "images": [{**img("train", "1000092795.jpg", "Two men."), "filepath": None}]}
    images = put_images(tmp_path / "images", "train2014/" + name(9), "val2014/COCO_val2014_000000000042.jpg")
    put_images(tmp_path / "flickr30k-images", "1000092795.jpg")
    coco_path = write_json(tmp_path / "dataset_coco.json", coco)
    records, skipped = run("karpathy", [coco_path], tmp_path / "coco.jsonl", images=images)
    assert [(r["id"], r["image"], r["caption"]) for r in records] == [
        ("9#0", "train2014/" + name(9), "A plate of food."),
        ("9#2", "train2014/" + name(9), "Food on a table."),
        ("42#0", "val2014/COCO_val2014_000000000042.jpg", "A dog."),
    ]
    assert {r["lang"] for r in records} == {"en"} and {r["task"] for r in records} == {"caption"}
    assert skipped == {"empty_text": 1, "other_split": 2, "unknown_split": 1, "missing_image": 1, "malformed": 1}
    test, _ = run("karpathy", [coco_path], tmp_path / "test.jsonl", split="test")  # unchecked without --images
    assert [(r["id"], r["image"]) for r in test] == [("2#0", "train2014/" + name(2))]

    flickr_path = write_json(tmp_path / "dataset_flickr30k.json", flickr)
    records, skipped = run("karpathy", [flickr_path], tmp_path / "f.jsonl", images=str(tmp_path / "flickr30k-images"))
    assert [(r["image"], r["caption"]) for r in records] == [("1000092795.jpg", "Two men.")] and skipped == {}


def test_coco_cn(tmp_path):
    root = tmp_path / "coco-cn-version1805v1.1"
    root.mkdir()
    (root / "coco-cn_train.txt").write_text("COCO_train2014_000000000009\nCOCO_train2014_000000000077\n")
    (root / "coco-cn_val.txt").write_text("COCO_val2014_000000000042\n")
    (root / "coco-cn_test.txt").write_text("COCO_val2014_000000000073\n")
    (root / "imageid.human-written-caption.txt").write_text(
        "COCO_train2014_000000000009#0\t桌子上放着一盘食物。\n"
        "COCO_train2014_000000000009#1\t 一盘 \n"
        "COCO_val2014_000000000042#0\t一只狗在草地上奔跑。\n"  # other_split
        "COCO_val2014_000000000099#0\t不在任何划分里。\n"  # unknown_split
        "COCO_train2014_000000000009#2\t\n"  # empty_text
        "COCO_train2014_000000000009 no tab\n"  # malformed
        "\n"
        "COCO_train2014_000000000077#0\t图片文件不在。\n",  # missing_image
        encoding="utf-8",
    )
    images = put_images(tmp_path / "coco", "train2014/COCO_train2014_000000000009.jpg")
    records, skipped = run(
        "coco-cn", [root / "imageid.human-written-caption.txt"], tmp_path / "cn.jsonl", images=images
    )
    assert [(r["id"], r["image"], r["caption"], r["lang"]) for r in records] == [
        ("COCO_train2014_000000000009#0", "train2014/COCO_train2014_000000000009.jpg", "桌子上放着一盘食物。", "zh"),
        ("COCO_train2014_000000000009#1", "train2014/COCO_train2014_000000000009.jpg", "一盘", "zh"),
    ]
    assert skipped == {"other_split": 1, "unknown_split": 1, "empty_text": 1, "malformed": 1, "missing_image": 1}
    os.remove(root / "coco-cn_val.txt")
    with pytest.raises(FileNotFoundError, match="coco-cn_val.txt"):
        run("coco-cn", [root / "imageid.human-written-caption.txt"], tmp_path / "v.jsonl", split="val")


def test_ai_challenger(tmp_path):
    root = tmp_path / "ai_challenger_caption_train_20170902"
    annotations = [
        {
            "url": "http://img.example/8f00f3d0f1008e085ab660e70dffced16a8259f6.jpg",
            "image_id": "8f00f3d0f1008e085ab660e70dffced16a8259f6.jpg",
            "caption": ["\n两个人在球场上打篮球", "一个 穿着 球衣的男人在投篮", "   ", "篮球场上有两个人"],
        },
        {
            "url": "http://img.example/b.jpg",
            "image_id": "b96ff46ec3a1e6f32b0a0e4d8c5ea7b2f7d5d1a3.jpg",
            "caption": ["x"],
        },
        {"url": "http://img.example/c.jpg", "image_id": "c.jpg", "caption": "not a list"},  # malformed
    ]
    path = write_json(root / "caption_train_annotations_20170902.json", annotations)
    images = put_images(root / "caption_train_images_20170902", "8f00f3d0f1008e085ab660e70dffced16a8259f6.jpg")
    records, skipped = run("ai-challenger", [path], tmp_path / "aic.jsonl", images=images)
    assert [(r["id"], r["caption"]) for r in records] == [
        ("8f00f3d0f1008e085ab660e70dffced16a8259f6#0", "两个人在球场上打篮球"),
        ("8f00f3d0f1008e085ab660e70dffced16a8259f6#1", "一个 穿着 球衣的男人在投篮"),
        ("8f00f3d0f1008e085ab660e70dffced16a8259f6#3", "篮球场上有两个人"),
    ]
    assert {(r["image"], r["lang"]) for r in records} == {("8f00f3d0f1008e085ab660e70dffced16a8259f6.jpg", "zh")}
    assert skipped == {"empty_text": 1, "missing_image": 1, "malformed": 1}


def test_vqav2_and_okvqa_join_questions_and_annotations(tmp_path):
    def questions(subtype, *qs):
        return {
            "info": {},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": subtype,
            "questions": [{"image_id": i, "question": q, "question_id": qid} for i, q, qid in qs],
            "license": {},
        }

    def annotation(qid, image_id, mc, answers):
        ann = {"question_type": "what", "answers": [], "image_id": image_id, "answer_type": "other", "question_id": qid}
        ann["answers"] = [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]
        return {**ann, "multiple_choice_answer": mc} if mc is not None else ann

    images = put_images(tmp_path / "coco", "val2014/COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg")
    q = write_json(
        tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
        questions(
            "val2014",
            (42, "What animal is this?", 420),
            (73, "What is he riding?", 730),
            (42, "Is it sunny?", 421),  # empty answer
            (99, "Where is its image?", 990),  # missing_image
            (42, "Never annotated?", 422),  # no_join_partner
        ),
    )
    a = write_json(
        tmp_path / "v2_mscoco_val2014_annotations.json",
        {
            "annotations": [
                annotation(420, 42, "dog", ["dog"] * 9 + ["puppy"]),
                annotation(730, 73, "motorcycle", ["motorcycle", "bike"]),
                annotation(421, 42, " ", ["yes"]),
                annotation(990, 99, "here", ["here"]),
                annotation(555, 42, "orphan", ["orphan"]),  # no_join_partner
                {"question_id": 730, "answers": "not a list"},  # malformed
            ]
        },
    )
    records, skipped = run("vqav2", [q, a], tmp_path / "vqa.jsonl", images=images)
    assert [(r["id"], r["image"], r["question"], r["answer"]) for r in records] == [
        ("420", "val2014/COCO_val2014_000000000042.jpg", "What animal is this?", "dog"),
        ("730", "COCO_val2014_000000000073.jpg", "What is he riding?", "motorcycle"),
    ]
    assert skipped == {"empty_text": 1, "missing_image": 1, "no_join_partner": 2, "malformed": 1}

    # OK-VQA: no multiple_choice_answer and no data_subtype; the majority answer, the split from the file name
    okq = questions(None, (9, "What food is this?", 90))
    del okq["data_subtype"]
    put_images(tmp_path / "coco", "train2014/COCO_train2014_000000000009.jpg")
    q = write_json(tmp_path / "ok" / "OpenEnded_mscoco_train2014_questions.json", okq)
    a = write_json(
        tmp_path / "ok" / "mscoco_train2014_annotations.json",
        {"annotations": [annotation(90, 9, None, ["bread", "pizza", "pizza", "bread", "pizza"])]},
    )
    records, skipped = run("okvqa", [q, a], tmp_path / "ok.jsonl", images=images)
    assert [(r["image"], r["answer"]) for r in records] == [("train2014/COCO_train2014_000000000009.jpg", "pizza")]
    assert skipped == {}


def test_gqa(tmp_path):
    questions = {
        "02930152": {"semantic": [], "entailed": [], "equivalent": ["02930152"], "question": "Is the sky dark?"}
        | {"imageId": "2354786", "answer": "yes", "fullAnswer": "Yes, the sky is dark.", "isBalanced": True},
        "07333408": {"imageId": "2375429", "question": "What is on the white wall?", "answer": "pipe"},
        "07333409": {"imageId": "n0000", "question": "Missing image?", "answer": "yes"},  # missing_image
        "07333410": {"imageId": "2354786", "question": "Empty?", "answer": ""},  # empty_text
        "07333411": {"question": "No image id?", "answer": "no"},  # malformed
    }
    path = write_json(tmp_path / "train_balanced_questions.json", questions)
    images = put_images(tmp_path / "images", "2354786.jpg", "2375429.jpg")
    records, skipped = run("gqa", [path], tmp_path / "gqa.jsonl", images=images)
    assert [(r["id"], r["image"], r["answer"]) for r in records] == [
        ("02930152", "2354786.jpg", "yes"),
        ("07333408", "2375429.jpg", "pipe"),
    ]
    assert skipped == {"missing_image": 1, "empty_text": 1, "malformed": 1}


def test_textvqa(tmp_path):
    def item(qid, image_id, question, answers, **extra):
        return {
            "question": question,
            "image_id": image_id,
            "image_classes": ["Poster"],
            "flickr_original_url": "https://farm.example/x.jpg",
            "flickr_300k_url": "https://farm.example/x_z.jpg",
            "image_width": 1024,
            "image_height": 664,
            "answers": answers,
            "question_tokens": question.split(),
            "question_id": qid,
            "set_name": "train",
            **extra,
        }

    data = {
        "dataset_type": "train",
        "dataset_name": "textvqa",
        "dataset_version": "0.5.1",
        "data": [
            item(0, "0054c91397f2fe05", "what is the brand?", ["toshiba"] + ["nokia"] * 6 + ["toshiba"] * 3),
            item(1, "0054c91397f2fe05", "what does it say?", []),  # empty_text
            item(2, "00ffffffffffffff", "where is the image?", ["here"]),  # missing_image
            item(3, 12345, "an int image id?", ["x"]),  # malformed
        ],
    }
    path = write_json(tmp_path / "TextVQA_0.5.1_train.json", data)
    images = put_images(tmp_path / "textvqa", "train_images/0054c91397f2fe05.jpg")
    records, skipped = run("textvqa", [path], tmp_path / "t.jsonl", images=images)
    assert [(r["id"], r["image"], r["answer"]) for r in records] == [
        ("0", "train_images/0054c91397f2fe05.jpg", "nokia")
    ]
    assert skipped == {"empty_text": 1, "missing_image": 1, "malformed": 1}


def test_ocr_vqa(tmp_path):
    def book(split, questions, answers, url="http://ecx.images-amazon.com/images/I/51Y5cOdHJbL.jpg"):
        return {
            "imageURL": url,
            "questions": questions,
            "answers": answers,
            "title": "A Title",
            "authorName": "An Author",
            "genre": "Calendars",
            "split": split,
        }

    data = {
        "761183272": book(1, ["Who wrote this book?", "What is the genre of this book?"], ["Sandra Boynton", " "]),
        "590452436": book(1, ["Is this a comic book?"], ["No"], url="http://ecx.images-amazon.com/images/I/x.png"),
        "1118002695": book(2, ["Who wrote this book?"], ["Someone"]),  # other_split
        "1118002696": book(7, ["Who wrote this book?"], ["Someone"]),  # unknown_split
        "1118002697": book(1, ["One question", "two"], ["one answer"]),  # malformed
        "1118002698": book(1, ["Where is the cover?"], ["Nowhere"]),  # missing_image
    }
    path = write_json(tmp_path / "dataset.json", data)
    images = put_images(tmp_path, "images/761183272.jpg", "images/590452436.png")
    records, skipped = run("ocr-vqa", [path], tmp_path / "ocr.jsonl", images=images)
    assert [(r["id"], r["image"], r["question"], r["answer"]) for r in records] == [
        ("761183272#0", "images/761183272.jpg", "Who wrote this book?", "Sandra Boynton"),
        ("590452436#0", "images/590452436.png", "Is this a comic book?", "No"),
    ]
    assert skipped == {"empty_text": 1, "other_split": 1, "unknown_split": 1, "malformed": 1, "missing_image": 1}
    val, _ = run("ocr-vqa", [path], tmp_path / "val.jsonl", split="val")
    assert [r["id"] for r in val] == ["1118002695#0"]


def refcoco_files(root, refs):
    """refcoco/refs(unc).p and refcoco/instances.json, COCO images 640x480 (1) and 300x200 (2, 3)."""
    instances = {
        "info": {},
        "licenses": [],
        "images": [
            {"license": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 480, "width": 640, "id": 1},
            {"license": 1, "file_name": "COCO_train2014_000000000002.jpg", "height": 200, "width": 300, "id": 2},
            {"license": 1, "file_name": "COCO_train2014_000000000003.jpg", "height": 200, "width": 300, "id": 3},
        ],
        "annotations": [
            {"segmentation": [[]], "area": 1.0, "iscrowd": 0, "image_id": image_id, "bbox": bbox, "category_id": 1}
            | {"id": ann_id}
            for ann_id, image_id, bbox in [
                (10, 1, [100, 50, 321, 200]),
                (11, 1, [600, 400, 100, 100]),  # over the right and bottom edges: clipped to 999
                (12, 1, [5, 5, 0, 10]),  # zero_area_box
                (13, 1, [100.1, 100.1, 0.2, 0.2]),  # zero area on the 0..999 grid
                (14, 1, [1, 2, 3]),  # bad_box
                (15, 1, [10, 10, -4, 5]),  # bad_box
                (16, 3, [10, 10, 50, 50]),  # its image file is missing
            ]
        ],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"}],
    }
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    write_json(os.path.join(root, "instances.json"), instances)
    return put_images(os.path.join(root, "..", "coco"), "train2014/COCO_train2014_000000000001.jpg")


def ref(ref_id, ann_id, split, *raws, image_id=1):
    return {
        "sent_ids": list(range(len(raws))),
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "ann_id": ann_id,
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "sentences": [{"tokens": r.split(), "raw": r, "sent_id": k, "sent": r.lower()} for k, r in enumerate(raws)],
        "category_id": 1,
    }


def test_refcoco(tmp_path):
    refs = [
        ref(0, 10, "train", "Man on the left", ""),  # the second sentence is empty
        ref(1, 11, "train", "bottom right corner"),
        ref(2, 12, "train", "a line"),  # zero_area_box
        ref(3, 13, "train", "a speck"),  # zero_area_box
        ref(4, 14, "train", "three numbers"),  # bad_box
        ref(5, 15, "train", "negative width"),  # bad_box
        ref(6, 10, "testA", "in test A"),  # other_split
        ref(7, 10, "dev", "odd split"),  # unknown_split
        ref(8, 99, "train", "no such annotation"),  # no_join_partner
        ref(9, 16, "train", "missing file", image_id=3),  # missing_image
        "not a ref",  # malformed
    ]
    images = refcoco_files(tmp_path / "refcoco", refs)
    records, skipped = run("refcoco", [tmp_path / "refcoco" / "refs(unc).p"], tmp_path / "ref.jsonl", images=images)
    # by hand: 640x480 -> x*1000/640, y*1000/480, floored; [100, 50, 321, 200] spans x 100..421, y 50..250
    assert [(r["id"], r["task"], r["phrase"], r["box"]) for r in records] == [
        ("0#0:grounding", "grounding", "Man on the left", [156, 104, 657, 520]),
        ("0#0:grounded_caption", "grounded_caption", "Man on the left", [156, 104, 657, 520]),
        ("1#0:grounding", "grounding", "bottom right corner", [937, 833, 999, 999]),
        ("1#0:grounded_caption", "grounded_caption", "bottom right corner", [937, 833, 999, 999]),
    ]
    assert {r["image"] for r in records} == {"train2014/COCO_train2014_000000000001.jpg"}
    assert skipped == {
        "empty_text": 1,
        "zero_area_box": 2,
        "bad_box": 2,
        "other_split": 1,
        "unknown_split": 1,
        "no_join_partner": 1,
        "missing_image": 1,
        "malformed": 1,
    }
    for r in records:  # the pipeline's own reading of these records
        assert formats.conversation(r["task"], r).turns[0].answer in (r["phrase"], formats.box_to_text(r["box"]))
    test_a, _ = run(
        "refcoco",
        [tmp_path / "refcoco" / "refs(unc).p", tmp_path / "refcoco" / "instances.json"],
        tmp_path / "a.jsonl",
        split="testA",
        task="grounding",
    )
    assert [(r["id"], r["task"]) for r in test_a] == [("6#0", "grounding")]


def test_refs_pickle_refuses_globals_without_running_them(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    refcoco_files(tmp_path / "refcoco", [])
    with open(tmp_path / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump([ref(0, 10, "train", "x"), Exploit()], f, protocol=2)
    with pytest.raises(ValueError, match=r"global '(posix|os)\.system' refused"):
        run("refcoco", [tmp_path / "refcoco" / "refs(unc).p"], tmp_path / "out.jsonl")
    assert not marker.exists() and not (tmp_path / "out.jsonl").exists()
    assert pickle.loads(pickle.dumps([Exploit()])) == [0] and marker.exists()  # the same pickle, unrestricted, runs
    # Python 2's cPickle wrote str as bytes (opcode U): they come back as str
    (tmp_path / "py2.p").write_bytes(b"\x80\x02]q\x00}q\x01U\x03rawq\x02U\x07a caf\xc3\xa9q\x03sa.")
    assert load_plain_pickle(str(tmp_path / "py2.p")) == [{"raw": "a café"}]


def test_visual_genome(tmp_path):
    image_data = [
        {"width": 640, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "height": 480, "image_id": 1}
        | {"coco_id": None, "flickr_id": None},
        {"width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K/2.jpg", "height": 600, "image_id": 2},
        {"width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K/3.jpg", "height": 600, "image_id": 3},
    ]

    def region(rid, image_id, phrase, x, y, w, h):
        return {"region_id": rid, "width": w, "height": h, "image_id": image_id, "phrase": phrase, "y": y, "x": x}

    regions = [
        {
            "regions": [
                region(1382, 1, "the clock is green in colour", 421, 57, 82, 139),
                region(1383, 1, "shade is along the street ", 320, 240, 0, 30),  # zero_area_box
                region(1384, 1, "", 10, 10, 20, 20),  # empty_text
                region(1385, 1, "a bad box", 10, "ten", 20, 20),  # bad_box
                "not a region",  # malformed
            ],
            "id": 1,
        },
        {"regions": [region(2001, 3, "its image file is missing", 0, 0, 10, 10)], "id": 3},  # missing_image
        {"regions": [region(3001, 9, "not in image_data", 0, 0, 10, 10)], "id": 9},  # no_join_partner
    ]
    root = tmp_path / "vg"
    write_json(root / "image_data.json", image_data)
    path = write_json(root / "region_descriptions.json", regions)
    images = put_images(tmp_path / "vg_images", "VG_100K_2/1.jpg", "VG_100K/2.jpg")
    records, skipped = run("visual-genome", [path], tmp_path / "vg.jsonl", images=images, task="grounded_caption")
    # by hand on 640x480: x 421..503 -> 657..785, y 57..196 -> 118..408
    assert records == [
        {
            "id": "1382",
            "image": "VG_100K_2/1.jpg",
            "phrase": "the clock is green in colour",
            "box": [657, 118, 785, 408],
            "task": "grounded_caption",
            "lang": "en",
        }
    ]
    assert skipped == {
        "zero_area_box": 1,
        "empty_text": 1,
        "bad_box": 1,
        "malformed": 1,
        "missing_image": 1,
        "no_join_partner": 1,
    }


def test_llava_instruct(tmp_path):
    def entry(eid, image, *values):
        turns = [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]
        return {"id": eid, **({"image": image} if image else {}), "conversations": turns}

    data = [
        entry(
            "000000033471",
            "000000033471.jpg",
            "What are the colors of the bus?\n<image>",
            "White and red.",
            "What feature can be seen on the back of the bus?",
            "An advertisement.",
        ),
        entry("000000052846", "000000052846.jpg", "Where is the cat?", "On the sofa."),  # no placeholder: added
        entry("text-only", None, "Write a poem.", "Roses..."),  # no_image
        entry("answer-image", "000000033471.jpg", "<image>\nWhat?", "This: <image>"),  # image_count_mismatch
        entry("two-images", "000000033471.jpg", "<image> and <image>?", "Same."),  # image_count_mismatch
        entry("empty-answer", "000000033471.jpg", "<image>\nWhat?", "  "),  # empty_text
        entry("odd", "000000033471.jpg", "<image>\nWhat?"),  # malformed
        entry("gone", "000000099999.jpg", "<image>\nWhat?", "Nothing."),  # missing_image
        entry("escape", "../secret.jpg", "<image>\nWhat?", "Nothing."),  # outside_image_dir
    ]
    path = write_json(tmp_path / "llava_instruct_150k.json", data)
    images = put_images(tmp_path / "train2017", "000000033471.jpg", "000000052846.jpg")
    records, skipped = run("llava", [path], tmp_path / "llava.jsonl", images=images)
    assert [(r["id"], r["image"]) for r in records] == [
        ("000000033471", "000000033471.jpg"),
        ("000000052846", "000000052846.jpg"),
    ]
    assert [m["value"] for m in records[0]["conversations"]] == [
        "<image>\nWhat are the colors of the bus?",
        "White and red.",
        "What feature can be seen on the back of the bus?",
        "An advertisement.",
    ]
    assert records[1]["conversations"][0]["value"] == "<image>\nWhere is the cat?"
    assert skipped == {
        "no_image": 1,
        "image_count_mismatch": 2,
        "empty_text": 1,
        "malformed": 1,
        "missing_image": 1,
        "outside_image_dir": 1,
    }


def test_m3it(tmp_path):
    def line(instruction, inputs, outputs, images):
        return json.dumps(
            {"instruction": instruction, "inputs": inputs, "outputs": outputs, "image_base64_str": images}
        )

    jpeg, png = (base64.b64encode(image_bytes(kind)).decode() for kind in ("JPEG", "PNG"))
    lines = [
        line("Write a short description for the image.", "", "A red square.", [jpeg]),
        line("Answer the question.", "Are the two frames alike?", "Yes.", [png, jpeg]),
        line("Describe.", "", "Not base64.", ["@@@@"]),  # corrupt_image
        line("Describe.", "", "Not an image.", [base64.b64encode(b"plain text").decode()]),  # corrupt_image
        line("Describe.", "", "No image.", []),  # no_image
        line("Describe.", "", "  ", [jpeg]),  # empty_text
        "{not json",  # malformed
    ]
    path = tmp_path / "data" / "captioning" / "coco" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "m3it.jsonl"
    records, skipped = run("m3it", [path], out)
    assert [r["image"] for r in records] == [
        "images/coco_train/00000000_0.jpg",
        ["images/coco_train/00000001_0.png", "images/coco_train/00000001_1.jpg"],
    ]
    assert [[m["value"] for m in r["conversations"]] for r in records] == [
        ["<image>\nWrite a short description for the image.", "A red square."],
        ["Answer the question.\nAre the two frames alike?", "Yes."],
    ]
    assert skipped == {"corrupt_image": 2, "no_image": 1, "empty_text": 1, "malformed": 1}
    source = ManifestSource(out)
    assert [Path(p).read_bytes() for p in source[1]["images"]] == [image_bytes("PNG"), image_bytes("JPEG")]
    conv = formats.place_images(formats.conversation("conversation", source[1]["annotation"]), 2)
    assert conv.prefix == "<image><image>"


def test_svit(tmp_path):
    def conv(*values, roles=("user", "gpt")):
        return {"content": [{"from": roles[k % 2], "value": v} for k, v in enumerate(values)]}

    data = [
        {
            "image_id": 1,
            "conversations": [
                conv("What is the color of the clock?", "Green.", "Where is it?", "On a pole."),
                conv("Where is <st>the clock<ed> [0.66, 0.12, 0.79, 0.41]?", "On <st>a pole<ed> [0.6, 0.1, 0.7, 0.9]."),
                conv("Anything else?", ""),  # empty_text
                {"no content": []},  # malformed
            ],
        },
        {"image_id": 2, "conversations": [conv("Can you describe the image in detail?", "A street at night.")]},
        {"image_id": 3, "conversations": [conv("Q?", "A."), conv("Q2?", "A2.")]},  # missing_image, twice
    ]
    path = write_json(tmp_path / "data" / "conversation.json", data)
    images = put_images(tmp_path / "vg", "VG_100K/1.jpg", "VG_100K_2/2.jpg")
    records, skipped = run("svit", [path], tmp_path / "svit.jsonl", images=images)
    assert [(r["id"], r["image"]) for r in records] == [("1#0", "VG_100K/1.jpg"), ("2#0", "VG_100K_2/2.jpg")]
    assert records[0]["conversations"] == [
        {"from": "human", "value": "<image>\nWhat is the color of the clock?"},
        {"from": "gpt", "value": "Green."},
        {"from": "human", "value": "Where is it?"},
        {"from": "gpt", "value": "On a pole."},
    ]
    assert skipped == {"foreign_boxes": 1, "empty_text": 1, "malformed": 1, "missing_image": 2}


def test_cli_writes_a_manifest_the_pipeline_reads(tmp_path):
    data = [
        {
            "id": "a",
            "image": "coco/a.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A red square."},
            ],
        },
        {
            "id": "b",
            "image": "coco/b.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nAnd this?"},
                {"from": "gpt", "value": "Missing."},
            ],
        },
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    path = write_json(tmp_path / "llava_v1_5_mix665k.json", data)
    images = put_images(tmp_path / "data", "coco/a.jpg")
    out = tmp_path / "manifest" / "train.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "ziya_jax.data", "convert", "--format", "llava", "--input", path]
        + ["--images", images, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"wrote 1 record to {out} (conversation 1)"
    assert lines[1:] == [
        "skipped 2:",
        "  missing_image: 1",
        "    e.g. llava_v1_5_mix665k.json[1]: coco/b.jpg",
        "  no_image: 1",
        "    e.g. llava_v1_5_mix665k.json[2]: a text-only conversation",
    ]
    source = ManifestSource(out, image_dir=images)
    [record] = [source[i] for i in range(len(source))]
    assert record["images"] == [os.path.join(images, "coco/a.jpg")] and os.path.isfile(record["images"][0])
    conv = formats.place_images(formats.conversation("conversation", record["annotation"]), 1)
    assert conv.turns == (formats.Turn("<image>\nWhat is it?", "A red square."),)


def test_cli_errors_are_one_line(tmp_path, capsys):
    def error(*argv):
        assert main(["convert", *argv, "--out", str(tmp_path / "o.jsonl")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
        return err

    assert "no such file or folder" in error("--format", "gqa", "--input", str(tmp_path / "nowhere.json"))
    listed = write_json(tmp_path / "dataset_coco.json", [1, 2])
    assert "missing field 'images'" in error("--format", "karpathy", "--input", listed)
    (tmp_path / "bad.json").write_text("{not json")
    assert "not valid JSON" in error("--format", "gqa", "--input", str(tmp_path / "bad.json"))
    assert "splits ['train', 'val', 'test']" in error("--format", "karpathy", "--input", listed, "--split", "dev")
    assert "each released file is one split" in error("--format", "gqa", "--input", listed, "--split", "train")
    assert "makes caption records, not vqa" in error("--format", "karpathy", "--input", listed, "--task", "vqa")
    assert "not a tar file" in error("--format", "img2dataset-tar", "--input", listed)
    assert "--images does not apply" in error("--format", "m3it", "--input", listed, "--images", str(tmp_path))
    assert "neither a VQA questions file" in error("--format", "vqav2", "--input", listed, "--input", listed)
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([]))
    assert "instances.json not found" in error("--format", "refcoco", "--input", str(tmp_path / "refs(unc).p"))
    assert not (tmp_path / "o.jsonl").exists()
