"""TFDS builders (ArrayRecord) for the synthetic set and for LLaVA-style manifests; no TensorFlow needed.

Every example is {"id": str, "images": encoded image bytes [n] (object), "annotation": JSON str}: images stay
encoded (PNG for the synthetic set, the files' own bytes for manifests) and are decoded by the pipeline,
which is also where bad images are counted. Read with `data_source(...)` (tfds.data_source / ArrayRecord
random access) and feed to `pipeline.Source`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ziya_jax.data import errors, images, manifest, synthetic

log = logging.getLogger(__name__)


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Tensor(shape=(), dtype=np.str_),
            "images": tfds.features.Tensor(shape=(None,), dtype=np.object_),
            "annotation": tfds.features.Tensor(shape=(), dtype=np.str_),
        }
    )


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder that downloads nothing. `code_path` locates a download-checksums file beside the builder's
    source; there is none to find, and finding it makes tfds 4.9 import `importlib_resources`, which it only
    declares as a dependency for Python < 3.9."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    image_size: int = 64
    seed: int = 0
    train: int = 20000
    validation: int = 1000
    test: int = 1000


class ZiyaSynthetic(_LocalBuilder):
    """The bundled synthetic bilingual shapes set (see ziya_jax.data.synthetic)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [SyntheticConfig(name="64px", image_size=64), SyntheticConfig(name="224px", image_size=224)]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=synthetic.__doc__, features=_features())

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in synthetic.SPLITS}

    def _generate_examples(self, split: str):
        c = self.builder_config
        for i in range(getattr(c, split)):
            image, scene = synthetic.generate(split, i, c.image_size, c.seed)
            png = io.BytesIO()
            Image.fromarray(image).save(png, "PNG")
            yield i, {"id": f"{split}-{i}", "images": [png.getvalue()], "annotation": json.dumps({"scene": scene})}


@dataclasses.dataclass(eq=False)
class ManifestConfig(tfds.core.BuilderConfig):
    manifests: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> manifest file
    image_dir: str = ""
    strict: bool = False  # raise on a missing image or an unparsable entry instead of leaving it out
    allow_any_image_path: bool = False  # image paths may lead out of the image folder
    max_image_bytes: int = images.DEFAULT_MAX_BYTES


class LlavaManifest(_LocalBuilder):
    """Any LLaVA-style manifest + image folder (see ziya_jax.data.manifest); pass a ManifestConfig."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=manifest.__doc__, features=_features())

    def _split_generators(self, dl_manager):
        c = self.builder_config
        if not c.manifests:
            raise ValueError("LlavaManifest needs ManifestConfig(manifests={split: path}, image_dir=...)")
        return {split: self._generate_examples(path) for split, path in c.manifests.items()}

    def _generate_examples(self, path: str):
        c = self.builder_config
        entries, _ = manifest.read_manifest(path, c.strict)
        left_out = collections.Counter()
        for n, entry in enumerate(entries):
            try:
                record = manifest.to_record(entry, c.image_dir or os.path.dirname(path), c.allow_any_image_path)
                blobs = [images.read_source(p, max_bytes=c.max_image_bytes) for p in record["images"]]
            except errors.BadSample as e:
                if c.strict:
                    raise ValueError(f"{entry['_where']}: {e}") from None
                left_out[e.reason] += 1
                continue
            yield (
                n,
                {
                    "id": record["id"],
                    "images": blobs,
                    "annotation": json.dumps(record["annotation"], ensure_ascii=False),
                },
            )
        if left_out:
            log.warning("%s: left out %d entries, by reason: %s", path, sum(left_out.values()), dict(left_out))


def build_synthetic(data_dir: str, config: SyntheticConfig | str = "64px") -> ZiyaSynthetic:
    """Writes the synthetic set (all splits) under data_dir as ArrayRecord; returns the builder."""
    builder = ZiyaSynthetic(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    return builder


def build_manifest(
    data_dir: str,
    name: str,
    manifests: dict[str, str],
    image_dir: str = "",
    strict: bool = False,
    allow_any_image_path: bool = False,
    max_image_bytes: int = images.DEFAULT_MAX_BYTES,
    overwrite: bool = False,
) -> LlavaManifest:
    """Writes a manifest data set (one split per manifest file) under data_dir/llava_manifest/name. The inputs
    (each manifest's content, the image folder, the options) are recorded with it: a build of the same inputs is
    kept and one of other inputs refused, unless `overwrite`, which rebuilds either. A failed build leaves no
    folder behind."""
    config = ManifestConfig(
        name=name,
        manifests=dict(manifests),
        image_dir=image_dir,
        strict=strict,
        allow_any_image_path=allow_any_image_path,
        max_image_bytes=max_image_bytes,
    )
    config.description = json.dumps(_inputs(config), sort_keys=True)
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    info = os.path.join(data_dir, LlavaManifest.name, name, str(LlavaManifest.VERSION), "dataset_info.json")
    if os.path.isfile(info):
        with open(info, encoding="utf-8") as f:
            built = json.load(f).get("configDescription")
        where = f"{LlavaManifest.name}/{name} in {data_dir}"
        changed = (
            f"it was built from other inputs ({_differences(built, config.description)})"
            if built != config.description
            else ""
        )
        if changed and not overwrite:
            raise ValueError(f"{where}: {changed}; pass --overwrite to rebuild it, or choose another --name")
        if overwrite:
            log.warning("rebuilding %s: %s", where, changed or "asked to overwrite it")
            mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    ours = [os.path.join(data_dir, LlavaManifest.name, name), os.path.join(data_dir, LlavaManifest.name)]
    tfds_made = [
        f
        for f in (os.path.join(data_dir, "downloads", "extracted"), os.path.join(data_dir, "downloads"), data_dir)
        if not os.path.exists(f)
    ]
    try:
        builder = LlavaManifest(data_dir=data_dir, config=config, file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    except BaseException:
        for folder in ours + tfds_made:  # deepest first; an empty one holds nothing worth keeping
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise
    return builder


def _inputs(config: ManifestConfig) -> dict:
    """What a manifest build is made of: each split's manifest content and image folder, and the options."""
    splits = {}
    for split, path in config.manifests.items():
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        splits[split] = {
            "manifest_sha256": digest,
            "image_dir": os.path.realpath(config.image_dir or os.path.dirname(path)),
        }
    return {
        "splits": splits,
        "strict": config.strict,
        "allow_any_image_path": config.allow_any_image_path,
        "max_image_bytes": config.max_image_bytes,
    }


def _differences(built: str | None, wanted: str) -> str:
    """Which recorded inputs differ, e.g. "split train manifest_sha256, strict"."""
    try:
        old = json.loads(built)
    except (TypeError, ValueError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("splits"), dict):
        return "it has no record of its inputs"
    new = json.loads(wanted)
    a, b = old["splits"], new["splits"]
    diffs = []
    for split in sorted(a.keys() | b.keys()):
        if split not in a or split not in b:
            diffs.append(f"split {split} {'added' if split in b else 'dropped'}")
        else:
            diffs += [f"split {split} {k}" for k in sorted(b[split]) if a[split].get(k) != b[split][k]]
    return ", ".join(diffs + [k for k in sorted(new) if k != "splits" and old.get(k) != new[k]])


def data_source(name: str, split: str, data_dir: str):
    """Random-access records of a built data set, e.g. ("ziya_synthetic/64px", "train", DIR)."""
    return tfds.data_source(name, split=split, data_dir=data_dir)
