"""TFDS builders (ArrayRecord) for the synthetic set and for LLaVA-style manifests; no TensorFlow needed.

Every example is {"id": str, "images": encoded image bytes [n] (object), "annotation": JSON str}: images stay
encoded (PNG for the synthetic set, the files' own bytes for manifests) and are decoded by the pipeline,
which is also where bad images are counted. Read with `data_source(...)` (tfds.data_source / ArrayRecord
random access) and feed to `pipeline.Source`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ziya_jax.data import manifest, synthetic

log = logging.getLogger(__name__)


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "id": tfds.features.Tensor(shape=(), dtype=np.str_),
        "images": tfds.features.Tensor(shape=(None,), dtype=np.object_),
        "annotation": tfds.features.Tensor(shape=(), dtype=np.str_),
    })


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
        missing = 0
        for n, entry in enumerate(entries):
            record = manifest.to_record(entry, c.image_dir or os.path.dirname(path))
            try:
                blobs = [_read(p) for p in record["images"]]
            except OSError as e:
                if c.strict:
                    raise FileNotFoundError(f"{entry['_where']}: image {e.filename}: {e.strerror}") from None
                missing += 1
                continue
            yield n, {"id": record["id"], "images": blobs, "annotation": json.dumps(record["annotation"],
                                                                                    ensure_ascii=False)}
        if missing:
            log.warning("%s: left out %d entries whose images could not be read", path, missing)


def _read(path) -> bytes:
    if not isinstance(path, str):
        raise OSError(f"image path of type {type(path).__name__}")
    with open(path, "rb") as f:
        return f.read()


def build_synthetic(data_dir: str, config: SyntheticConfig | str = "64px") -> ZiyaSynthetic:
    """Writes the synthetic set (all splits) under data_dir as ArrayRecord; returns the builder."""
    builder = ZiyaSynthetic(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    return builder


def build_manifest(data_dir: str, name: str, manifests: dict[str, str], image_dir: str = "",
                   strict: bool = False) -> LlavaManifest:
    """Writes a manifest data set (one split per manifest file) under data_dir/llava_manifest/name."""
    config = ManifestConfig(name=name, manifests=dict(manifests), image_dir=image_dir, strict=strict)
    builder = LlavaManifest(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    return builder


def data_source(name: str, split: str, data_dir: str):
    """Random-access records of a built data set, e.g. ("ziya_synthetic/64px", "train", DIR)."""
    return tfds.data_source(name, split=split, data_dir=data_dir)
