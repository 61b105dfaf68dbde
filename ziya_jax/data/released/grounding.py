"""Grounding readers: RefCOCO / RefCOCO+ / RefCOCOg (a refs pickle joined with COCO's instances.json) and Visual
Genome's region descriptions. Each phrase and box makes a grounding record, a grounded_caption record, or both."""

from __future__ import annotations

import os

from ziya_jax.data.annotations import coco_candidates, field, load_json
from ziya_jax.data.released import common
from ziya_jax.data.released.common import Skip

REFCOCO_SPLITS = ("train", "val", "test", "testA", "testB")  # unc: train/val/testA/testB; umd: train/val/test


def _pair(inputs, first_ext: str, partner: str) -> tuple[str, str]:
    """(the one input ending in first_ext, its partner file: the other input, or `partner` beside the first)."""
    firsts = [p for p in inputs if p.endswith(first_ext)]
    others = [p for p in inputs if not p.endswith(first_ext)]
    if len(firsts) != 1 or len(others) > 1:
        raise ValueError(f"expected one *{first_ext} file and at most one {partner}, got {list(inputs)}")
    other = others[0] if others else os.path.join(os.path.dirname(firsts[0]), partner)
    if not os.path.isfile(other):
        raise FileNotFoundError(f"{other} not found: give the {partner} released with {firsts[0]}")
    return firsts[0], other


def read_refcoco(ctx):
    """refs(unc).p / refs(umd).p / refs(google).p: a pickled list of refs {ref_id, ann_id, image_id, split,
    sentences: [{raw, sent}]}; the box is the instance's bbox [x, y, w, h] in instances.json (released beside it),
    on its image's width x height; one record per sentence of the split's refs."""
    refs_path, instances_path = _pair(ctx.inputs, ".p", "instances.json")
    refs = common.load_plain_pickle(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    instances = load_json(instances_path)
    images = _by_id(field(instances, "images", instances_path, list))
    anns = _by_id(field(instances, "annotations", instances_path, list))
    for n, ref in enumerate(common.progress(refs, refs_path)):
        where = f"{os.path.basename(refs_path)}[{n}]"
        yield from common.guarded(where, _refcoco, ctx, ref, images, anns, where)


def _by_id(items: list) -> dict:
    return {item["id"]: item for item in items if isinstance(item, dict) and "id" in item}


def _refcoco(ctx, ref, images: dict, anns: dict, where: str):
    split = field(ref, "split", where, str)
    if split != ctx.split:
        yield Skip(common.OTHER_SPLIT if split in REFCOCO_SPLITS else common.UNKNOWN_SPLIT, where, split)
        return
    ann, img = anns.get(field(ref, "ann_id", where, int)), images.get(field(ref, "image_id", where, int))
    if ann is None or img is None:
        missing = f"annotation {ref['ann_id']}" if ann is None else f"image {ref['image_id']}"
        yield Skip(common.NO_JOIN_PARTNER, where, f"{missing} is not in instances.json")
        return
    box = common.normalized_box(ann.get("bbox"), img.get("width"), img.get("height"), where)
    image = box if isinstance(box, Skip) else ctx.image(coco_candidates(field(img, "file_name", where, str)), where)
    if isinstance(image, Skip):
        yield image
        return
    for k, sentence in enumerate(field(ref, "sentences", where, list)):
        phrase = sentence.get("raw") or sentence.get("sent") or ""
        rec_id = f"{ref.get('ref_id', where)}#{k}"
        yield from common.grounded(rec_id, image, phrase, box, ctx.tasks, f"{where}.sentences[{k}]")


def read_visual_genome(ctx):
    """region_descriptions.json ([{id: image id, regions: [{region_id, x, y, width, height, phrase}]}]) with
    image_data.json (released beside it: [{image_id (id in v1.0), width, height, url}]); images in VG_100K/ and
    VG_100K_2/ as the url says; one record per region."""
    regions_path, images_path = _pair(ctx.inputs, "region_descriptions.json", "image_data.json")
    images = {}
    for img in load_json(images_path):
        if isinstance(img, dict) and ("image_id" in img or "id" in img):
            images[img.get("image_id", img.get("id"))] = img
    entries = load_json(regions_path)
    if not isinstance(entries, list):
        raise ValueError(f"{regions_path}: expected a list of {{id, regions}}, got {type(entries).__name__}")
    for n, entry in enumerate(common.progress(entries, regions_path)):
        where = f"{os.path.basename(regions_path)}[{n}]"
        regions = entry.get("regions") if isinstance(entry, dict) else None
        if not isinstance(regions, list):
            yield Skip(common.MALFORMED, where, "no regions list")
            continue
        info = images.get(entry.get("id", entry.get("image_id")))
        image = _vg_image(ctx, info, where) if info else Skip(common.NO_JOIN_PARTNER, where, "not in image_data.json")
        for k, region in enumerate(regions):
            region_where = f"{where}.regions[{k}]"
            if isinstance(image, Skip):
                yield Skip(image.reason, region_where, image.detail)
            else:
                yield from common.guarded(region_where, _vg_region, ctx, image, info, region, region_where)


def _vg_image(ctx, info: dict, where: str):
    image_id = info.get("image_id", info.get("id"))
    url = info.get("url") or ""
    from_url = "/".join(url.split("/")[-2:]) if url.count("/") >= 2 else ""
    return ctx.image([p for p in (from_url, f"VG_100K/{image_id}.jpg", f"VG_100K_2/{image_id}.jpg") if p], where)


def _vg_region(ctx, image: str, info: dict, region, where: str):
    box = [region.get(k) for k in ("x", "y", "width", "height")]
    box = common.normalized_box(box, info.get("width"), info.get("height"), where)
    if isinstance(box, Skip):
        yield box
        return
    rec_id = str(region.get("region_id", where))
    yield from common.grounded(rec_id, image, region.get("phrase"), box, ctx.tasks, where)
