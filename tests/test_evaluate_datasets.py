"""Readers of the benchmarks' released annotation formats, on the hand-made files in tests/data/eval."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ziya_jax.evaluate import datasets

DATA = os.path.join(os.path.dirname(__file__), "data", "eval")
# Where each data set's images live, relative to the images folder, as the released layouts name them.
IMAGES = [
    "0013ea2087020901.jpg",
    "00223d9f0a2e4cfb.jpg",
    "0041ed1b6a3a6b31.jpg",  # NoCaps
    "1000092795.jpg",
    "10002456.jpg",
    "1000268201.jpg",
    "1000344755.jpg",  # Flickr30k(-CNA)
    "val2014/COCO_val2014_000000000042.jpg",
    "val2014/COCO_val2014_000000000073.jpg",  # COCO-CN, VQAv2,
    "train2014/COCO_train2014_000000000009.jpg",  # OKVQA
    "n161313.jpg",
    "n336443.jpg",  # GQA
    "test/5/image.png",
    "test/7/image.png",
    "train/9/image.png",  # ScienceQA
    "VizWiz_val_00000000.jpg",
    "VizWiz_val_00000001.jpg",
]  # VizWiz


def make_images(root) -> str:
    """Small distinct images at every path the hand-made annotations refer to."""
    rng = np.random.default_rng(0)
    for rel in IMAGES:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return str(root)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


def test_caption_readers(images):
    nocaps = datasets.read_nocaps(DATA, images)
    assert [it.id for it in nocaps] == ["0", "1", "2"]
    assert nocaps[0].references == ["A man riding a brown horse on a beach.", "A person on horseback near the sea."]
    assert [it.meta["domain"] for it in nocaps] == ["in-domain", "out-domain", "in-domain"]
    assert all(os.path.isfile(it.image) for it in nocaps)

    flickr = datasets.read_karpathy(DATA, images, "test")
    assert [os.path.basename(it.image) for it in flickr] == ["1000092795.jpg", "1000268201.jpg"]
    assert len(flickr[1].references) == 2
    assert [it.id for it in datasets.read_karpathy(DATA, images, "train")] == ["1"]

    coco_cn = datasets.read_coco_cn(DATA, images, "test")
    assert [it.id for it in coco_cn] == ["COCO_val2014_000000000042", "COCO_val2014_000000000073"]
    assert coco_cn[0].references == ["一只狗在草地上奔跑。", "草地上有一只棕色的狗。"]
    assert coco_cn[0].image.endswith(os.path.join("val2014", "COCO_val2014_000000000042.jpg"))
    assert [it.id for it in datasets.read_coco_cn(DATA, images, "train")] == ["COCO_train2014_000000000009"]

    cna = datasets.read_flickr30k_cna(DATA, images)
    assert [it.id for it in cna] == ["1000092795", "1000268201", "1000344755"]
    assert all(len(it.references) == 2 for it in cna)
    assert [it.id for it in datasets.read_captions(os.path.join(DATA, "flickr30k_cn_test.txt"), images)] == [
        it.id for it in cna
    ]
    assert len(datasets.read_captions(os.path.join(DATA, "nocaps_val_4500_captions.json"), images)) == 3


def test_vqa_readers(images):
    v2 = datasets.read_vqa(DATA, images, "val2014")
    assert [it.id for it in v2] == ["420000", "420001", "730000"]
    assert v2[0].question == "What color is the dog?" and len(v2[0].answers) == 10
    assert v2[0].answers.count("brown") == 6 and v2[1].meta["answer_type"] == "number"
    assert v2[2].image.endswith(os.path.join("val2014", "COCO_val2014_000000000073.jpg"))
    ok = datasets.read_vqa(DATA, images, "val2014", okvqa=True)
    assert [it.question for it in ok] == ["What breed is this animal?"]
    gqa = datasets.read_gqa(DATA, images)
    assert [(it.id, it.answers) for it in gqa] == [
        ("20968379", ["yes"]),
        ("20968380", ["dog"]),
        ("201640614", ["white"]),
    ]
    viz = datasets.read_vizwiz(DATA, images)
    assert viz[0].answers.count("unanswerable") == 7 and viz[0].meta == {"answer_type": "unanswerable", "answerable": 0}


def test_scienceqa_keeps_the_splits_problems_with_images(images):
    sqa = datasets.read_scienceqa(DATA, images, "test")
    assert [it.id for it in sqa] == ["5", "7"]  # 6 has no image, 9 is in train
    assert sqa[0].choices[sqa[0].answer] == "West Virginia" and sqa[1].context == "The passage describes an experiment."
    assert sqa[0].image.endswith(os.path.join("test", "5", "image.png"))


def test_missing_and_malformed_inputs(images, tmp_path):
    with pytest.raises(FileNotFoundError, match="no annotation file or folder"):
        datasets.read_gqa(str(tmp_path / "nowhere"), images)
    with pytest.raises(FileNotFoundError, match="holds none of"):
        datasets.read_gqa(str(tmp_path), images)
    with pytest.raises(FileNotFoundError, match=r"3 of 3 images are missing"):
        datasets.read_nocaps(DATA, str(tmp_path))
    (tmp_path / "testdev_balanced_questions.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        datasets.read_gqa(str(tmp_path), images)
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps({"1": {"question": "q?"}}))
    with pytest.raises(ValueError, match="missing field 'imageId'"):
        datasets.read_gqa(str(tmp_path), images)
    bad = tmp_path / "flickr30k_cn_test.txt"
    bad.write_text("1000092795 no tab here\n")
    with pytest.raises(ValueError, match=r"flickr30k_cn_test.txt:1: expected IMAGE#k<TAB>caption"):
        datasets.read_flickr30k_cna(str(tmp_path), images)
    with pytest.raises(FileNotFoundError, match="coco-cn_val.txt"):
        datasets.read_coco_cn(DATA, images, "val")
