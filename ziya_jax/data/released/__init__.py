"""Readers of the public data sets' released files that write the training manifest (JSON lines in the schemas of
`ziya_jax.data.formats`, read by `ziya_jax.data.manifest.ManifestSource`). `convert` is
`python -m ziya_jax.data convert`; docs/data.md has the table of formats, the files each reads and what it skips.

Image paths in the manifest are relative to --images (the folder to give the training manifest as its image
folder); with --images each path is checked, and a record whose image is not there is skipped. Formats that carry
their images inside the released files (img2dataset shards, M3IT) write them under images/ beside the manifest,
whose folder is then the image folder. Every record that is not written is counted by reason; one malformed record
never stops a file, while a file that is missing or laid out otherwise stops the conversion with a one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from ziya_jax.data.released import captions, conversations, grounding, vqa
from ziya_jax.data.released.common import Context, Result, Skip


@dataclasses.dataclass(frozen=True)
class Format:
    read: Callable[[Context], Iterator[Result]]
    tasks: tuple[str, ...]  # what its records are for; where several, --task picks one (default: all)
    splits: tuple[str, ...] = ()  # the --split names its files hold, the default first; () when a file is a split
    carries_images: bool = False  # its images are inside the released files


_GROUNDING = ("grounding", "grounded_caption")
FORMATS = {
    "img2dataset-tar": Format(captions.read_img2dataset_tar, ("caption",), carries_images=True),
    "img2dataset-parquet": Format(captions.read_img2dataset_parquet, ("caption",), carries_images=True),
    "karpathy": Format(captions.read_karpathy, ("caption",), tuple(captions.KARPATHY_SPLITS)),
    "coco-cn": Format(captions.read_coco_cn, ("caption",), captions.COCO_CN_SPLITS),
    "ai-challenger": Format(captions.read_ai_challenger, ("caption",)),
    "vqav2": Format(vqa.read_vqa, ("vqa",)),
    "okvqa": Format(vqa.read_vqa, ("vqa",)),
    "gqa": Format(vqa.read_gqa, ("vqa",)),
    "textvqa": Format(vqa.read_textvqa, ("vqa",)),
    "ocr-vqa": Format(vqa.read_ocr_vqa, ("vqa",), tuple(vqa.OCR_VQA_SPLITS.values())),
    "refcoco": Format(grounding.read_refcoco, _GROUNDING, grounding.REFCOCO_SPLITS),
    "refcoco+": Format(grounding.read_refcoco, _GROUNDING, grounding.REFCOCO_SPLITS),
    "refcocog": Format(grounding.read_refcoco, _GROUNDING, grounding.REFCOCO_SPLITS),
    "visual-genome": Format(grounding.read_visual_genome, _GROUNDING),
    "llava": Format(conversations.read_llava, ("conversation",)),
    "m3it": Format(conversations.read_m3it, ("conversation",), carries_images=True),
    "svit": Format(conversations.read_svit, ("conversation",)),
}

EXAMPLES_PER_REASON = 3


@dataclasses.dataclass
class Report:
    """What a conversion wrote and skipped (a few examples of each reason)."""

    out: str
    written: Counter = dataclasses.field(default_factory=Counter)  # records by task
    skipped: Counter = dataclasses.field(default_factory=Counter)  # records by reason
    examples: dict[str, list[Skip]] = dataclasses.field(default_factory=dict)

    def add(self, result: Result) -> None:
        if isinstance(result, Skip):
            self.skipped[result.reason] += 1
            shown = self.examples.setdefault(result.reason, [])
            if len(shown) < EXAMPLES_PER_REASON:
                shown.append(result)
        else:
            self.written[result["task"]] += 1

    def summary(self) -> str:
        tasks = ", ".join(f"{task} {n}" for task, n in sorted(self.written.items()))
        n = self.written.total()
        lines = [f"wrote {n} record{'' if n == 1 else 's'} to {self.out}" + (f" ({tasks})" if tasks else "")]
        if self.skipped:
            lines.append(f"skipped {self.skipped.total()}:")
            for reason, count in self.skipped.most_common():
                lines.append(f"  {reason}: {count}")
                lines += [f"    e.g. {s.where}" + (f": {s.detail}" if s.detail else "") for s in self.examples[reason]]
        return "\n".join(lines)


def convert(
    name: str,
    inputs: Sequence[str],
    out: str,
    images: str | None = None,
    split: str | None = None,
    task: str | None = None,
) -> Report:
    """Read the released files `inputs` of format `name` and write the manifest `out` (JSON lines). Raises
    ValueError / OSError for arguments that do not fit the format and files missing or laid out otherwise."""
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    for path in inputs:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--input {path}: no such file or folder")
    if images is not None and not os.path.isdir(images):
        raise FileNotFoundError(f"--images {images}: no such folder")
    if images is not None and fmt.carries_images:
        raise ValueError(f"{name} carries its images inside the released files: --images does not apply")
    if split is not None and split not in fmt.splits:
        raise ValueError(
            f"{name} has splits {list(fmt.splits)}, not {split!r}"
            if fmt.splits
            else f"{name}: each released file is one split; give that split's files and no --split"
        )
    if task is not None and task not in fmt.tasks:
        raise ValueError(f"{name} makes {' and '.join(fmt.tasks)} records, not {task}")
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    ctx = Context(
        inputs, out_dir, images, split or (fmt.splits[0] if fmt.splits else None), (task,) if task else fmt.tasks
    )
    report, partial = Report(out), out + ".partial"
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for result in fmt.read(ctx):
                report.add(result)
                if not isinstance(result, Skip):
                    f.write(json.dumps(result, ensure_ascii=False) + "\n")
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return report
