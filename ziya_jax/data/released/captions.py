"""Caption readers: img2dataset's webdataset tar shards and parquet files (stage 1 image-text pairs), Karpathy's
split files of COCO and Flickr30k, COCO-CN's caption files and AI Challenger's caption annotations."""

from __future__ import annotations

import glob
import json
import os
import tarfile

from ziya_jax.data.annotations import coco_candidates, field, karpathy_image, load_json, tsv_caption
from ziya_jax.data.released import common
from ziya_jax.data.released.common import Skip

_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # img2dataset's --encode_format choices, as member or column names


def _shards(inputs, ext: str) -> list[str]:
    """The input files, a folder standing for its *ext files in order."""
    paths = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, f"*{ext}")))
            if not found:
                raise FileNotFoundError(f"{path} holds no *{ext} files")
            paths += found
        else:
            paths.append(path)
    return paths


def read_img2dataset_tar(ctx):
    """Shards 00000.tar whose samples are members KEY.jpg (or .png/.webp), KEY.txt (the caption) and KEY.json
    (img2dataset's metadata); the images are written to images/SHARD/ beside the manifest."""
    for path in _shards(ctx.inputs, ".tar"):
        folder = ctx.image_folder(path)
        try:
            tar = tarfile.open(path, "r|*")  # streamed: a shard is read once, front to back
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{path} is not a tar file: {e}") from None
        with tar:
            samples = _Samples(tar)
            for position, (key, files) in enumerate(common.progress(samples, path)):
                where = f"{os.path.basename(path)}:{key}"
                yield from common.guarded(where, _tar_sample, ctx, folder, position, key, files, where)
            if samples.broken:
                yield Skip(common.TRUNCATED_FILE, os.path.basename(path), samples.broken)


class _Samples:
    """A shard's samples (key, {extension: bytes}): webdataset's grouping of consecutive members by the name up
    to the first dot, done with tarfile (the webdataset package would be a dependency for these few lines). A
    shard cut short ends early, with `broken` saying why."""

    def __init__(self, tar):
        self.tar, self.broken = tar, ""

    def __iter__(self):
        key, files = None, {}
        try:
            for member in self.tar:
                folder, base = os.path.split(member.name)
                stem, dot, ext = base.partition(".")
                if not member.isfile() or not dot:
                    continue
                name = f"{folder}/{stem}" if folder else stem
                data = self.tar.extractfile(member).read()
                if key is not None and name != key:
                    yield key, files
                    files = {}
                key = name
                files[ext.lower()] = data
        except (tarfile.TarError, OSError, EOFError) as e:
            self.broken = f"{type(e).__name__}: {e}"
        if key is not None:
            yield key, files


def _tar_sample(ctx, folder: str, position: int, key: str, files: dict, where: str):
    meta = json.loads(files["json"]) if "json" in files else {}
    if meta.get("status", "success") != "success":
        yield Skip(common.DOWNLOAD_FAILED, where, str(meta.get("error_message") or meta["status"]))
        return
    image = next((files[k] for k in _IMAGE_KEYS if k in files), None)
    if image is None:
        yield Skip(common.NO_IMAGE, where, f"members {sorted(files)}")
        return
    text = common.clean(files["txt"].decode("utf-8") if "txt" in files else meta.get("caption") or "")
    if not text:
        yield Skip(common.EMPTY_TEXT, where, "caption")
        return
    rel = ctx.write_image(folder, f"{position:09d}", image, where)
    shard = os.path.basename(folder)
    yield rel if isinstance(rel, Skip) else common.caption(f"{shard}/{key}", rel, text, where)


def read_img2dataset_parquet(ctx):
    """img2dataset's parquet files: with --output_format parquet a row holds the image bytes (column jpg, or the
    encode format's name), the caption (txt, or caption) and the metadata; the parquet files written beside tar
    shards hold the metadata only, and their rows are skipped (no_image)."""
    import pyarrow  # only this format reads parquet
    import pyarrow.parquet as pq

    for path in _shards(ctx.inputs, ".parquet"):
        try:
            table = pq.ParquetFile(path)
        except (pyarrow.ArrowException, OSError) as e:
            raise ValueError(f"{path} is not a parquet file: {e}") from None
        names = table.schema_arrow.names
        image_col = next((c for c in _IMAGE_KEYS if c in names), None)
        text_col = next((c for c in ("txt", "caption") if c in names), None)
        if text_col is None:
            raise ValueError(f"{path} has no caption column (txt or caption); its columns: {names}")
        folder = ctx.image_folder(path) if image_col else ""
        columns = [c for c in (image_col, text_col, "key", "status", "error_message") if c in names]

        def rows(table=table, columns=columns):
            for batch in table.iter_batches(batch_size=256, columns=columns):
                yield from batch.to_pylist()

        for position, row in enumerate(common.progress(rows(), path, table.metadata.num_rows)):
            where = f"{os.path.basename(path)}:{row.get('key') or position}"
            yield from common.guarded(where, _parquet_row, ctx, folder, image_col, text_col, position, row, where)


def _parquet_row(ctx, folder: str, image_col, text_col: str, position: int, row: dict, where: str):
    if row.get("status") not in (None, "success"):
        yield Skip(common.DOWNLOAD_FAILED, where, str(row.get("error_message") or row["status"]))
        return
    if image_col is None or row[image_col] is None:
        yield Skip(common.NO_IMAGE, where, "no image column (url-only metadata)" if image_col is None else "no bytes")
        return
    text = common.clean(row[text_col] or "")
    if not text:
        yield Skip(common.EMPTY_TEXT, where, "caption")
        return
    rel = ctx.write_image(folder, f"{position:09d}", row[image_col], where)
    shard = os.path.basename(folder)
    yield rel if isinstance(rel, Skip) else common.caption(f"{shard}/{row.get('key') or position}", rel, text, where)


KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}  # restval: COCO's extra train


def read_karpathy(ctx):
    """Karpathy's dataset_coco.json / dataset_flickr30k.json: {images: [{filepath?, filename, split,
    sentences: [{raw}]}]}; one record per sentence."""
    for path in ctx.inputs:
        images = field(load_json(path), "images", path, list)
        for n, img in enumerate(common.progress(images, path)):
            where = f"{os.path.basename(path)}:images[{n}]"
            yield from common.guarded(where, _karpathy, ctx, img, where)


def _karpathy(ctx, img, where: str):
    split = field(img, "split", where, str)
    rel, sentences = karpathy_image(img, where)
    if split not in ("restval", *KARPATHY_SPLITS):
        yield Skip(common.UNKNOWN_SPLIT, where, split)
        return
    if split not in KARPATHY_SPLITS[ctx.split]:
        yield Skip(common.OTHER_SPLIT, where, split)
        return
    image = ctx.image(list(dict.fromkeys([rel, os.path.basename(rel)])), where)
    if isinstance(image, Skip):
        yield image
        return
    image_id = img.get("cocoid", img.get("imgid", rel))
    for k, raw in enumerate(sentences):
        yield common.caption(f"{image_id}#{k}", image, raw, f"{where}.sentences[{k}]", "en")


COCO_CN_SPLITS = ("train", "val", "test")


def read_coco_cn(ctx):
    """COCO-CN's imageid.human-written-caption.txt (or imageid.manually-translated-caption.txt): lines
    `COCO_val2014_000000000042#0<TAB>caption`; the split is the list coco-cn_SPLIT.txt released beside it."""
    for path in ctx.inputs:
        lists = {}
        for split in COCO_CN_SPLITS:
            list_path = os.path.join(os.path.dirname(path), f"coco-cn_{split}.txt")
            if os.path.isfile(list_path):
                with open(list_path, encoding="utf-8") as f:
                    lists[split] = {line.strip() for line in f if line.strip()}
        if ctx.split not in lists:
            raise FileNotFoundError(f"COCO-CN split list coco-cn_{ctx.split}.txt is not beside {path}")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for n, line in enumerate(common.progress(lines, path), 1):
            where = f"{os.path.basename(path)}:{n}"
            if line.strip():
                yield from common.guarded(where, _coco_cn, ctx, lists, line, where)


def _coco_cn(ctx, lists: dict, line: str, where: str):
    image_id, text = tsv_caption(line, where)
    if image_id not in lists[ctx.split]:
        known = any(image_id in ids for ids in lists.values())
        yield Skip(common.OTHER_SPLIT if known else common.UNKNOWN_SPLIT, where, image_id)
        return
    image = ctx.image(coco_candidates(f"{image_id}.jpg"), where)
    yield image if isinstance(image, Skip) else common.caption(line.split("\t")[0], image, text, where, "zh")


def read_ai_challenger(ctx):
    """AI Challenger's caption_{train,validation}_annotations_*.json: [{url, image_id: "NAME.jpg", caption: [5
    Chinese sentences]}]; images in caption_*_images_*/; one record per sentence."""
    for path in ctx.inputs:
        items = load_json(path)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a list of {{url, image_id, caption}}, got {type(items).__name__}")
        for n, item in enumerate(common.progress(items, path)):
            where = f"{os.path.basename(path)}[{n}]"
            yield from common.guarded(where, _ai_challenger, ctx, item, where)


def _ai_challenger(ctx, item, where: str):
    name = field(item, "image_id", where, str)
    sentences = field(item, "caption", where, list)
    image = ctx.image([name], where)
    if isinstance(image, Skip):
        yield image
        return
    for k, text in enumerate(sentences):
        yield common.caption(f"{os.path.splitext(name)[0]}#{k}", image, text, f"{where}.caption[{k}]", "zh")
