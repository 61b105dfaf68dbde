"""The synthetic bilingual set: determinism, disjoint splits, coverage, boxes that match the pixels,
answers that match the scene."""

import collections
import re

import numpy as np
import pytest

from ziya_jax.data import errors, formats, synthetic


@pytest.fixture(scope="module")
def scenes():
    return [synthetic.generate("train", i, 32)[1] for i in range(300)]


def test_examples_are_deterministic_and_splits_disjoint():
    a_img, a_scene = synthetic.generate("train", 5, 64, seed=3)
    b_img, b_scene = synthetic.generate("train", 5, 64, seed=3)
    assert (a_img == b_img).all() and a_scene == b_scene
    train = {synthetic.generate("train", i, 32)[0].tobytes() for i in range(40)}
    for split in ("validation", "test"):
        assert not train & {synthetic.generate(split, i, 32)[0].tobytes() for i in range(40)}
    assert not (synthetic.generate("train", 5, 64, seed=4)[0] == a_img).all()
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        synthetic.generate("dev", 0)


def test_scenes_cover_the_vocabulary_and_keep_objects_nameable(scenes):
    seen = collections.defaultdict(set)
    for scene in scenes:
        objs = scene["objects"]
        assert 1 <= len(objs) <= synthetic.MAX_OBJECTS
        assert len({o["position"] for o in objs}) == len(objs)  # one object per cell
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)  # "colour shape" names one object
        seen["count"].add(len(objs))
        for o in objs:
            for key in ("color", "shape", "size", "position"):
                seen[key].add(o[key])
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= 999 and 0 <= y1 < y2 <= 999
    assert len(seen["color"]) == len(synthetic.COLORS) >= 6 and len(seen["shape"]) == len(synthetic.SHAPES) == 5
    assert len(seen["size"]) == 3 and len(seen["position"]) == 9 and seen["count"] == {1, 2, 3, 4}


@pytest.mark.parametrize("shape", [s for s, _ in synthetic.SHAPES])
def test_box_is_where_the_shape_is_drawn(shape):
    size = 96
    box = [30.0, 20.0, 62.0, 52.0]
    scene = {
        "objects": [{"color": "blue", "shape": shape, "size": "large", "position": "center", "box_px": box}],
        "background": {"level": 128.0, "tint": np.zeros(3), "angle": 0.0, "ramp": 0.0, "noise": 0.0},
    }
    image = synthetic.render(scene, size, np.random.default_rng(0)).astype(int)
    ys, xs = np.nonzero(np.abs(image - 128).sum(-1) > 30)
    assert len(xs) > 100
    assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1.5
    assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1.5


def test_generated_boxes_contain_their_objects():
    image, scene = synthetic.generate("train", 11, 128)
    for obj in scene["objects"]:
        x1, y1, x2, y2 = (np.array(obj["box"]) * 128 / 1000).astype(int)
        rgb = np.array(synthetic._RGB[obj["color"]])
        close = np.abs(image.astype(int) - rgb).max(-1) < 45
        inside = close[y1 : y2 + 2, x1 : x2 + 2].sum()
        assert inside > 10 and inside >= 0.8 * close.sum() / max(
            1, sum(o["color"] == obj["color"] for o in scene["objects"])
        )


def test_answers_follow_the_scene(scenes):
    rng = np.random.default_rng(0)
    yes = 0
    for scene in scenes:
        objs = {o["position"]: o for o in scene["objects"]}
        for lang in formats.LANGS:
            q, a = synthetic.vqa(scene, "count", lang, rng)
            assert a == str(len(objs))
            q, a = synthetic.vqa(scene, "color", lang, rng)
            said = re.fullmatch(
                r"(.+)的物体是什么颜色？" if lang == "zh" else r"What color is the object at the (.+)\?", q
            ).group(1)
            pos = next(p for p, zh in synthetic.POSITIONS if (zh if lang == "zh" else p) == said)
            assert a == synthetic._word(objs[pos]["color"], lang)
            q, a = synthetic.vqa(scene, "position", lang, rng)
            assert any(
                synthetic._word(o["color"], lang) in q
                and synthetic._word(o["shape"], lang) in q
                and a == synthetic._word(p, lang)
                for p, o in objs.items()
            )
            q, a = synthetic.vqa(scene, "yesno", lang, rng)
            assert a in ("yes", "是", "no", "否")
            yes += a in ("yes", "是")
            assert bool(re.search(r"[\u4e00-\u9fff]", q)) == (lang == "zh")
    assert 0.4 < yes / (2 * len(scenes)) < 0.6


def test_every_task_in_both_languages(scenes):
    rng = np.random.default_rng(1)
    scene = scenes[0]
    for lang in formats.LANGS:
        for task in formats.TASKS:
            conv = formats.conversation(task, synthetic.annotate(scene, task, lang, rng))
            assert conv.turns and all(t.query and t.answer for t in conv.turns)
            if task == "grounding":
                assert formats.parse_boxes(conv.turns[0].answer)[0] in [tuple(o["box"]) for o in scene["objects"]]
            if task == "conversation":
                assert 2 <= len(conv.turns) <= 3
    with pytest.raises(errors.BadSample) as e:
        synthetic.annotate(scene, "ocr", "en", rng)
    assert e.value.reason == errors.UNKNOWN_TASK


def test_source_is_random_access():
    src = synthetic.SyntheticSource("validation", 10, image_size=32)
    rec = src[3]
    assert len(src) == 10 and rec["id"] == "validation-3" and rec["images"][0].shape == (32, 32, 3)
    assert (rec["images"][0] == synthetic.generate("validation", 3, 32)[0]).all()
    with pytest.raises(IndexError):
        src[10]


def test_cell_labels_name_each_cell_or_nothing(scenes):
    empty = [len(names) for names in synthetic.CELL_ATTRIBUTES.values()]
    for scene in scenes[:50]:
        labels = synthetic.cell_labels(scene)
        assert labels.shape == (synthetic.GRID**2, 3)
        by_cell = {[p for p, _ in synthetic.POSITIONS].index(o["position"]): o for o in scene["objects"]}
        for cell, row in enumerate(labels):
            obj = by_cell.get(cell)
            expected = empty if obj is None else [names.index(obj[a]) for a, names in synthetic.CELL_ATTRIBUTES.items()]
            assert list(row) == expected
