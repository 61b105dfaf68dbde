"""Grain pipelines: the batch contract (fed to ZiyaVisual), exact resume, process shards, mixture weights,
seeded shuffles, bad samples counted by reason (or raised when strict), augmentation, TFDS without TF."""

import collections
import io
import json
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from ziya_jax.data import errors, images, pipeline, synthetic, tokenizers
from ziya_jax.data.manifest import ManifestSource
from ziya_jax.data.pipeline import DataConfig, Source

Q = 4


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    llm, q = synthetic.train_demo_tokenizers(str(tmp_path_factory.mktemp("tok")), num_scenes=60)
    return tokenizers.SentencePieceTokenizer.load(llm), tokenizers.QFormerTokenizer.from_sentencepiece(q)


def config(toks, **kw):
    base = dict(
        batch_size=4,
        text_len=96,
        image_size=28,
        num_query_tokens=Q,
        image_token_id=toks[0].vocab_size,
        max_images=2,
        qformer_text_len=24,
    )
    return DataConfig(**{**base, **kw})


def batches(sources, toks, n=None, process=(0, 1), **kw):
    it = iter(pipeline.instruction_batches(sources, config(toks, **kw), *toks, *process))
    out = list(it) if n is None else [next(it) for _ in range(n)]
    return out, it


def text_records(n, prefix="r", answer=lambda i: str(i)):
    return [
        {"id": f"{prefix}{i}", "images": [], "annotation": {"question": f"question {i}?", "answer": answer(i)}}
        for i in range(n)
    ]


def answers(batch, tok):
    return [tok.decode(ids[mask == 1][:-1]) for ids, mask in zip(batch["input_ids"], batch["loss_mask"])]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def synth(n=64, split="train"):
    return synthetic.SyntheticSource(split, n, image_size=28)


def tiny_model(toks):
    """configs/tiny.py's Chat model with these tokenizers' vocabularies and Q query tokens."""
    from ziya_jax.config import ModelConfig, load_config

    tok, qtok = toks
    model = load_config("configs/tiny.py:variant=chat").model.to_dict()
    model["llm"] = dict(model["llm"], vocab_size=tok.vocab_size + 1)
    model["qformer"] = dict(model["qformer"], vocab_size=qtok.vocab_size)
    return ModelConfig.from_dict(dict(model, image_token_id=tok.vocab_size, num_query_tokens=Q, instruction_len=24))


def two_images():
    """One record whose conversation shows two images."""
    return [
        {
            "id": "two",
            "images": list(synth(2)[0]["images"]) + list(synth(2)[1]["images"]),
            "annotation": {
                "conversations": [{"from": "human", "value": "<image> vs <image>?"}, {"from": "gpt", "value": "same"}]
            },
        }
    ]


def test_batch_contract_and_model_forward(toks):
    import jax

    from ziya_jax.model import ZiyaVisual, init_params

    tok, qtok = toks
    sources = [Source(synth(), task) for task in ("caption", "vqa", "grounding", "conversation")]
    sources.append(Source(two_images(), "conversation"))
    (batch,), _ = batches(sources, toks, n=1, batch_size=5, shuffle=False)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "input_ids": ((5, 96), np.int32),
        "attention_mask": ((5, 96), np.int32),
        "loss_mask": ((5, 96), np.int32),
        "pixel_values": ((5, 2, 28, 28, 3), np.float32),
        "image_mask": ((5, 2), np.int32),
        "qformer_ids": ((5, 24), np.int32),
        "qformer_mask": ((5, 24), np.int32),
    }
    placeholders = (batch["input_ids"] == tok.vocab_size).sum(1)
    assert list(placeholders) == list(batch["image_mask"].sum(1) * Q) == [Q, Q, Q, Q, 2 * Q]
    assert (batch["pixel_values"][batch["image_mask"] == 0] == 0).all()
    assert (batch["qformer_ids"][:, 0] == qtok.cls_id).all()

    cfg = tiny_model(toks)
    params = init_params(cfg, jax.random.key(0))
    keys = ("input_ids", "attention_mask", "pixel_values", "qformer_ids", "qformer_mask")
    logits = jax.jit(lambda p, b: ZiyaVisual(cfg).apply({"params": p}, *(b[k] for k in keys)))(params, batch)
    assert logits.shape == (5, 96, tok.vocab_size + 1) and np.isfinite(np.asarray(logits)).all()

    base, _ = batches(sources[:1], toks, n=1, qformer_text_len=0)
    assert "qformer_ids" not in base[0]


def segments(batch):
    """(row, start, length) of each packed example, in row order."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        for k in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == k)
            assert len(where) and (np.diff(where) == 1).all()  # contiguous, numbered in order
            out.append((r, int(where[0]), len(where)))
    return out


def test_packed_rows_hold_the_same_examples_and_give_the_same_logits(toks):
    import jax
    import ml_collections

    from ziya_jax.model import ZiyaVisual, init_params
    from ziya_jax.train.losses import lm_loss
    from ziya_jax.train.sharded import batch_shapes

    sources = [Source(synth(), task) for task in ("caption", "vqa", "grounding", "conversation")]
    sources += [Source(two_images(), "conversation"), Source(text_records(8), "vqa")]
    packed, it = batches(sources, toks, n=3, pack=True, batch_size=3, max_images=3, shuffle=False)
    plain, _ = batches(sources, toks, n=40, batch_size=1, shuffle=False)
    n, t = 3, 96
    used = 0
    cfg = tiny_model(toks)
    params = init_params(cfg, jax.random.key(0))
    keys = ("input_ids", "attention_mask", "pixel_values", "qformer_ids", "qformer_mask", "positions")
    forward = jax.jit(
        lambda p, b, seg: ZiyaVisual(cfg).apply({"params": p}, *(b.get(k) for k in keys), segment_ids=seg)
    )
    data = ml_collections.ConfigDict(dict(batch_size=n, text_len=t, max_images=3, pack=True))
    for batch in packed:
        assert batch_shapes(data, cfg, stage1=False) == {k: (v.shape, v.dtype) for k, v in batch.items()}
        assert batch["qformer_ids"].shape == (n, 3, 24)
        logits = np.asarray(forward(params, batch, batch["segment_ids"]))
        mine = segments(batch)
        # First fit in stream order: the batch holds the next len(mine) examples, each whole, in some rows.
        expected = plain[used : used + len(mine)]
        used += len(mine)
        alone = [np.asarray(forward(params, ex, None)) for ex in expected]  # each example's logits, unpacked
        assert sorted(b["input_ids"][0].tobytes() for b in expected) == sorted(
            np.pad(batch["input_ids"][r, a : a + m], (0, t - m), constant_values=toks[0].pad_id).tobytes()
            for r, a, m in mine
        )
        slot = collections.Counter()
        for r, a, m in mine:
            j = next(
                j
                for j, b in enumerate(expected)
                if b["attention_mask"][0].sum() == m
                and b["input_ids"][0, :m].tobytes() == batch["input_ids"][r, a : a + m].tobytes()
            )
            ex = expected[j]
            np.testing.assert_array_equal(batch["positions"][r, a : a + m], np.arange(m))
            np.testing.assert_array_equal(batch["loss_mask"][r, a : a + m], ex["loss_mask"][0, :m])
            k = int(ex["image_mask"].sum())
            np.testing.assert_array_equal(batch["pixel_values"][r, slot[r] : slot[r] + k], ex["pixel_values"][0, :k])
            assert (batch["qformer_ids"][r, slot[r] : slot[r] + k] == ex["qformer_ids"][0]).all()
            slot[r] += k
            np.testing.assert_allclose(logits[r, a : a + m], alone[j][0, :m], atol=2e-5, rtol=1e-4)
        for r in range(n):
            assert batch["attention_mask"][r].sum() == sum(m for rr, _, m in mine if rr == r) <= t
            assert batch["image_mask"][r].sum() == slot[r] <= 3
            assert (batch["segment_ids"][r] > 0).sum() == batch["attention_mask"][r].sum()
        # The loss is the token mean over the same answer tokens as unpacked.
        loss = lm_loss(logits, batch["input_ids"], batch["loss_mask"])
        nll = [
            float(lm_loss(x, ex["input_ids"], ex["loss_mask"])) * ex["loss_mask"][0, 1:].sum()
            for x, ex in zip(alone, expected)
        ]
        np.testing.assert_allclose(loss, sum(nll) / sum(ex["loss_mask"][0, 1:].sum() for ex in expected), rtol=1e-4)
    assert used > 3 * n  # rows hold several examples


def test_packed_iterator_restores_to_exactly_the_next_batches(toks):
    bad = text_records(30, "bad", answer=lambda i: "" if i % 3 == 0 else str(i))
    sources = [Source(synth(), "caption"), Source(synth(), "vqa", 2.0), Source(bad, "vqa")]
    kw = dict(pack=True, batch_size=2, max_images=2)
    _, it = batches(sources, toks, n=3, **kw)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = iter(pipeline.instruction_batches(sources, config(toks, **kw), *toks, 0, 1))
    resumed.set_state(state)
    assert_same([next(resumed) for _ in range(4)], expected)
    assert resumed.skipped == it.skipped and it.skipped[errors.EMPTY_TEXT] > 0


def test_restored_iterator_continues_with_exactly_the_next_batches(toks):
    bad = text_records(30, "bad", answer=lambda i: "" if i % 3 == 0 else str(i))  # every third is skipped
    sources = [Source(synth(), "vqa", 2.0), Source(bad, "vqa", 1.0)]
    _, it = batches(sources, toks, n=5)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(4)]
    assert it.skipped[errors.EMPTY_TEXT] > 0
    resumed = iter(pipeline.instruction_batches(sources, config(toks), *toks, 0, 1))
    resumed.set_state(state)
    assert_same([next(resumed) for _ in range(4)], expected)
    assert resumed.skipped == it.skipped


def rows_of(batches_):
    return sorted(
        b["input_ids"][i].tobytes() + b["pixel_values"][i].tobytes()
        for b in batches_
        for i in range(len(b["input_ids"]))
    )


def test_worker_processes_prepare_the_same_rows_and_resume(toks):
    bad = text_records(40, "bad", answer=lambda i: "" if i % 4 == 0 else str(i))
    sources = [Source(synth(), "caption"), Source(bad, "vqa")]
    plain, _ = batches(sources, toks, n=8)
    cfg = config(toks, num_workers=2)
    it = iter(pipeline.instruction_batches(sources, cfg, *toks, 0, 1))
    try:
        got = [next(it) for _ in range(2)]
        state = json.loads(json.dumps(it.get_state()))
        got += [next(it) for _ in range(2)]
        skipped = dict(it.skipped)
    finally:
        it.close()
    # Each worker batches its own slice (0, 2, 4, ... and 1, 3, 5, ...): the rows are those made without
    # workers, in another order (and, as each worker skips its own bad samples, not quite the first ones).
    assert not collections.Counter(rows_of(got)) - collections.Counter(rows_of(plain))
    assert len(set(rows_of(got))) == 16 and skipped.get(errors.EMPTY_TEXT, 0) > 0
    resumed = iter(pipeline.instruction_batches(sources, cfg, *toks, 0, 1))
    try:
        resumed.set_state(state)
        assert_same([next(resumed) for _ in range(2)], got[2:])
        assert resumed.skipped == skipped
    finally:
        resumed.close()


def test_processes_see_disjoint_shards_that_cover_the_data(toks):
    records = text_records(40)
    seen = []
    for index in range(2):
        out, _ = batches([Source(records, "vqa")], toks, process=(index, 2), num_epochs=1)
        seen.append([a for b in out for a in answers(b, toks[0])])
    assert len(seen[0]) == len(seen[1]) == 20
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == {str(i) for i in range(40)}


def test_mixture_weights_hold(toks):
    sources = [Source(text_records(50, name), "vqa", w) for name, w in (("a", 0.6), ("b", 0.3), ("c", 0.1))]
    ds = pipeline.mixture(sources, config(toks, seed=3), 0, 1)
    counts = collections.Counter(ds[i][0]["id"][0] for i in range(6000))
    for name, w in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
        assert abs(counts[name] / 6000 - w) < 0.01
    recs = text_records(100)
    tasks = pipeline.mixture([Source(recs, "vqa", 3), Source(recs, "caption", 1)], config(toks), 0, 1)
    share = np.mean([tasks[i][1] == "vqa" for i in range(4000)])
    assert abs(share - 0.75) < 0.01


@pytest.mark.parametrize("n", [30, pipeline.SMALL_SOURCE + 10])  # SmallShuffle and grain's index shuffle
def test_shuffle_is_seeded_and_changes_each_epoch(toks, n):
    recs = text_records(n)

    def order(**kw):
        ds = pipeline.mixture([Source(recs, "vqa")], config(toks, **kw), 0, 1)
        return [ds[i][0]["id"] for i in range(2 * n)]

    a = order(seed=1)
    assert a == order(seed=1) and a != order(seed=2)
    assert sorted(a[:n]) == sorted(a[n:]) == sorted(r["id"] for r in recs) and a[:n] != a[n:]
    assert order(shuffle=False)[:n] == [r["id"] for r in recs]


def png_bomb():
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def encoded(im, fmt="PNG"):
    out = io.BytesIO()
    im.save(out, fmt)
    return out.getvalue()


GOOD = ("good.png", "gray.png", "gray16.png", "pal.png", "rgba.png", "cmyk.jpg")
BAD_ENTRIES = {  # reason -> manifest entry
    errors.EMPTY_IMAGE: {"image": "zero.png"},
    errors.CORRUPT_IMAGE: {"image": "corrupt.jpg"},
    errors.TRUNCATED_IMAGE: {"image": "trunc.png"},
    errors.DECOMPRESSION_BOMB: {"image": "bomb.png"},
    errors.MISSING_FILE: {"image": "missing.png"},
    errors.EMPTY_TEXT: {"image": "good.png", "answer": "  "},
    errors.TEXT_TOO_LONG: {"image": "good.png", "question": "long " * 200},
    errors.UNKNOWN_TASK: {"image": "good.png", "task": "ocr"},
    errors.IMAGE_COUNT_MISMATCH: {"image": "good.png", "question": "<image> or <image>: which is brighter?"},
    errors.TOO_MANY_IMAGES: {"image": ["good.png", "gray.png", "pal.png"]},
    errors.BAD_ANNOTATION: {"image": "good.png", "task": "grounding", "phrase": "x", "box": [5, 5, 1, 1]},
}


def entry(**kw):
    return {"question": "What color?", "answer": "red", **kw}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    good = Image.fromarray(rgb)
    rgba = np.concatenate([rgb, np.full((40, 40, 1), 128, np.uint8)], -1)
    files = {
        "good.png": encoded(good),
        "gray.png": encoded(good.convert("L")),
        "gray16.png": encoded(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)),
        "pal.png": encoded(good.convert("P")),
        "rgba.png": encoded(Image.fromarray(rgba, "RGBA")),
        "cmyk.jpg": encoded(good.convert("CMYK"), "JPEG"),
        "zero.png": b"",
        "corrupt.jpg": b"\xff\xd8 this is no jpeg" * 20,
        "bomb.png": png_bomb(),
    }
    files["trunc.png"] = files["good.png"][:900]
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def write_manifest(path, entries, junk_line=False):
    lines = [json.dumps(e) for e in entries]
    if junk_line:
        lines.insert(1, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_bad_input_is_skipped_and_counted(toks, image_dir, tmp_path):
    two = {
        "image": ["good.png", "rgba.png"],
        "conversations": [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "no"}],
    }
    entries = (
        [entry(id=f"ok-{name}", image=name) for name in GOOD]
        + [two]
        + [entry(id=reason, **e) for reason, e in BAD_ENTRIES.items()]
    )
    src = ManifestSource(write_manifest(tmp_path / "m.jsonl", entries, junk_line=True), image_dir)
    assert list(src.invalid) == [f"{tmp_path / 'm.jsonl'}:2"]
    out, it = batches([Source(src)], toks, batch_size=1, num_epochs=1, shuffle=False, text_len=64)
    assert it.skipped == {reason: 1 for reason in BAD_ENTRIES} | {errors.INVALID_ENTRY: 1}  # the line not JSON
    assert len(out) == len(GOOD) + 1
    assert [b["image_mask"][0].tolist() for b in out] == [[1, 0]] * len(GOOD) + [[1, 1]]
    want = images.to_pixels(images.open_rgb(str(image_dir / "rgba.png")), 28)
    np.testing.assert_allclose(out[-1]["pixel_values"][0, 1], want, atol=1e-6)


@pytest.mark.parametrize("reason", list(BAD_ENTRIES))
def test_strict_mode_raises_with_the_sample_and_reason(toks, image_dir, tmp_path, reason):
    path = write_manifest(
        tmp_path / "m.jsonl", [entry(id="fine", image="good.png"), entry(id=f"sample-{reason}", **BAD_ENTRIES[reason])]
    )
    it = iter(
        pipeline.instruction_batches(
            [Source(ManifestSource(path, image_dir))],
            config(toks, batch_size=1, strict=True, shuffle=False, text_len=64),
            *toks,
            0,
            1,
        )
    )
    next(it)
    with pytest.raises(errors.BadSampleError, match=f"sample-{reason}.*{reason}") as e:
        next(it)
    image = BAD_ENTRIES[reason]["image"]
    if reason in (
        errors.EMPTY_IMAGE,
        errors.CORRUPT_IMAGE,
        errors.TRUNCATED_IMAGE,
        errors.DECOMPRESSION_BOMB,
        errors.MISSING_FILE,
    ):
        assert image in str(e.value)


def test_bad_manifest_lines_raise_in_strict_mode(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", [entry(image="a.png")] * 2, junk_line=True)
    with pytest.raises(ValueError, match=r"m.jsonl:2: not JSON"):
        ManifestSource(path, strict=True)


def test_a_source_of_only_bad_samples_fails_instead_of_spinning(toks):
    bad = text_records(5, answer=lambda i: "")
    with pytest.raises(RuntimeError, match="12 bad samples in a row.*empty_text"):
        batches([Source(bad, "vqa")], toks, n=1, max_consecutive_skips=12)


def test_configuration_errors_are_named(toks):
    with pytest.raises(ValueError, match="unknown task 'ocr'"):
        pipeline.mixture([Source(synth(), "ocr", name="mine")], config(toks), 0, 1)
    with pytest.raises(ValueError, match="no records for process 3 of 4"):
        pipeline.mixture([Source(text_records(3), "vqa")], config(toks), 3, 4)
    with pytest.raises(ValueError, match="needs a qformer_tokenizer"):
        pipeline.instruction_batches([Source(synth())], config(toks), toks[0], None, 0, 1)
    with pytest.raises(ValueError, match="languages"):
        config(toks, languages=("fr",))


def test_augmentation_crops_only_geometry_free_samples_and_is_off_by_default(toks):
    scenes = synth(8)
    photos = [
        {
            "id": f"p{i}",
            "images": scenes[i]["images"],
            "annotation": {"caption": "a photo", "phrase": "a thing", "box": [0, 0, 500, 500]},
        }
        for i in range(8)
    ]

    def rows(records, task, augment):
        out, _ = batches([Source(records, task)], toks, batch_size=8, num_epochs=1, shuffle=False, augment=augment)
        return out[0]["pixel_values"][:, 0]

    plain = rows(photos, "caption", False)
    for i in range(8):
        np.testing.assert_allclose(plain[i], images.to_pixels(images.open_rgb(photos[i]["images"][0]), 28), atol=1e-6)
    cropped = rows(photos, "caption", True)
    assert not np.allclose(cropped, plain) and np.abs(cropped).max() > 0
    np.testing.assert_array_equal(rows(photos, "grounding", True), plain)  # boxes must stay true
    np.testing.assert_array_equal(rows(scenes, "caption", True), plain)  # positions and counts must stay true


def test_pair_batches_for_stage_one(toks):
    tok, qtok = toks
    it = iter(
        pipeline.pair_batches(
            [Source(synth(16), "caption")], config(toks, qformer_text_len=48, num_epochs=1, shuffle=False), qtok, 0, 1
        )
    )
    batch = next(it)
    assert {k: v.shape for k, v in batch.items()} == {
        "pixel_values": (4, 28, 28, 3),
        "text_ids": (4, 48),
        "text_mask": (4, 48),
        "itg_ids": (4, 48),
    }
    assert (batch["text_ids"][:, 0] == qtok.cls_id).all() and (batch["itg_ids"][:, 0] == qtok.dec_id).all()
    np.testing.assert_array_equal(batch["itg_ids"][:, 1:], batch["text_ids"][:, 1:])
    for i in range(4):
        scene = synthetic.generate("train", i, 28)[1]
        text = qtok.decode(batch["text_ids"][i][batch["text_mask"][i] == 1][1:-1])
        assert any(synthetic.caption(scene, lang).startswith(text) and len(text) > 10 for lang in ("en", "zh"))


def test_tfds_builders_work_without_tensorflow(toks, image_dir, tmp_path):
    from ziya_jax.data import tfds_builders

    cfg = tfds_builders.SyntheticConfig(name="t28", image_size=28, train=12, validation=2, test=2)
    tfds_builders.build_synthetic(str(tmp_path / "tfds"), cfg)
    stored = tfds_builders.data_source("ziya_synthetic/t28", "train", str(tmp_path / "tfds"))
    assert len(stored) == 12

    def rows(source):
        out, _ = batches([Source(source, "caption")], toks, batch_size=1, num_epochs=1, languages=("en",))
        return {b["input_ids"].tobytes() + b["pixel_values"].tobytes() for b in out}

    assert rows(stored) == rows(synth(12))  # PNG storage is lossless: same rows as rendering on the fly

    manifest = write_manifest(
        tmp_path / "train.jsonl",
        [entry(id="a", image="good.png"), entry(id="b", image="missing.png"), entry(id="c", image="trunc.png")],
    )
    tfds_builders.build_manifest(str(tmp_path / "tfds"), "mine", {"train": str(manifest)}, str(image_dir))
    records = tfds_builders.data_source("llava_manifest/mine", "train", str(tmp_path / "tfds"))
    assert sorted(r["id"] for r in (records[i] for i in range(len(records)))) == [b"a", b"c"]  # missing left out
    out, it = batches([Source(records)], toks, batch_size=1, num_epochs=1, text_len=64)
    assert len(out) == 1 and it.skipped == {errors.TRUNCATED_IMAGE: 1}
    assert "tensorflow" not in sys.modules
