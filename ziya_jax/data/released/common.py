"""What every reader of released files shares: a skipped record and its reasons, where a record's image is, the
images that released files carry inside them, the record schemas of `formats`, and safe loading of pickles."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

from PIL import Image
from tqdm.auto import tqdm

from ziya_jax.data import errors, formats
from ziya_jax.paths import inside

# Why a record of a released file was not written, as counted in the conversion's report.
MALFORMED = "malformed"  # a field is missing or of the wrong type
EMPTY_TEXT = errors.EMPTY_TEXT  # an empty caption, question, answer, phrase or turn
MISSING_IMAGE = "missing_image"  # with --images: no file at any path the layout gives
OUTSIDE_IMAGE_DIR = errors.OUTSIDE_IMAGE_DIR  # an image path that is absolute or leads out with ..
NO_IMAGE = "no_image"  # the record names or carries no image (url-only parquet, a text-only conversation)
DOWNLOAD_FAILED = "download_failed"  # img2dataset's status says the image was not fetched
BAD_BOX = "bad_box"  # not 4 finite numbers, negative size, or wholly outside the image
ZERO_AREA_BOX = "zero_area_box"  # no width or height, in pixels or once on the 0..999 grid
UNKNOWN_SPLIT = "unknown_split"  # a split the layout does not define
OTHER_SPLIT = "other_split"  # a record of a split other than the one converted
NO_JOIN_PARTNER = "no_join_partner"  # its question / image / object is not in the file it is joined with
FOREIGN_BOXES = "foreign_boxes"  # boxes in another coordinate convention than Ziya's 0..999
TRUNCATED_FILE = "truncated_file"  # a shard cut short: the samples after the cut are lost
IMAGE_COUNT_MISMATCH = errors.IMAGE_COUNT_MISMATCH  # more <image> placeholders than images, or one in an answer

# A lookup on a malformed record fails with one of these; the record is skipped, the file goes on.
RECORD_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError)


@dataclasses.dataclass(frozen=True)
class Skip:
    """A record of a released file that is not written: why, where it is, what was seen."""

    reason: str
    where: str
    detail: str = ""


Result = dict | Skip  # what readers yield: a manifest record, or a record skipped


class Context:
    """One conversion: its input files, the image folder (--images), the manifest's folder (images carried inside
    the released files are written under it), the split and the tasks to make."""

    def __init__(self, inputs: Sequence[str], out_dir: str, images: str | None, split: str | None, tasks=()):
        self.inputs, self.out_dir, self.images = list(inputs), out_dir, images
        self.split, self.tasks = split, tuple(tasks)
        self._folders: set[str] = set()

    def image(self, candidates: Sequence[str], where: str) -> str | Skip:
        """A record's image path relative to --images: the first of the layout's candidate paths that is a file
        there; without --images the first, unchecked. Absolute paths and paths out of the folder are refused."""
        for path in candidates:
            if not _plain_relative(path) or (self.images is not None and not inside(self.images, path)):
                return Skip(OUTSIDE_IMAGE_DIR, where, repr(path))
        if self.images is None:
            return candidates[0]
        found = next((p for p in candidates if os.path.isfile(os.path.join(self.images, p))), None)
        return found if found is not None else Skip(MISSING_IMAGE, where, " or ".join(dict.fromkeys(candidates)))

    def image_folder(self, source: str) -> str:
        """A new folder under the manifest's images/ for the images one input file carries, named after it."""
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(source))[0]) or "input"
        name, n = base, 1
        while name in self._folders:
            n += 1
            name = f"{base}_{n}"
        self._folders.add(name)
        return f"images/{name}"

    def write_image(self, folder: str, stem: str, data: bytes, where: str) -> str | Skip:
        """Carried image bytes -> a file folder/stem.EXT beside the manifest (the bytes as they are, EXT from the
        format they hold) -> its path relative to the manifest's folder. Only the header is read here: bytes that
        are no image are skipped now, pixels that fail to decode are counted by the training pipeline."""
        if not data:
            return Skip(errors.EMPTY_IMAGE, where, "0 bytes")
        try:
            with Image.open(io.BytesIO(data)) as im:
                kind = im.format
        except Image.DecompressionBombError as e:
            return Skip(errors.DECOMPRESSION_BOMB, where, str(e))
        except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
            return Skip(errors.CORRUPT_IMAGE, where, str(e))
        rel = f"{folder}/{stem}.{_EXTENSIONS.get(kind, str(kind).lower())}"
        os.makedirs(os.path.join(self.out_dir, folder), exist_ok=True)
        with open(os.path.join(self.out_dir, rel), "wb") as f:
            f.write(data)
        return rel


_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def _plain_relative(path) -> bool:
    return (
        isinstance(path, str)
        and bool(path)
        and "\0" not in path
        and not os.path.isabs(path)
        and ".." not in re.split(r"[\\/]", path)
    )


def guarded(where: str, parse: Callable[..., Iterable[Result]], *args) -> Iterator[Result]:
    """parse(*args)'s results; a malformed record becomes one MALFORMED skip instead of stopping the file."""
    try:
        yield from parse(*args)
    except RECORD_ERRORS as e:
        yield Skip(MALFORMED, where, str(e)[:200])


def progress(items: Iterable, desc: str, total: int | None = None) -> Iterable:
    """A progress bar on stderr when it is a terminal."""
    return tqdm(items, desc=os.path.basename(desc), total=total, unit="rec", disable=None, leave=False)


def clean(text) -> str:
    """Whitespace runs (released captions carry newlines and double spaces) as single spaces, ends stripped."""
    if not isinstance(text, str):
        raise ValueError(f"text is {type(text).__name__} {text!r:.40}, want a string")
    return " ".join(text.split())


def most_common(answers: Sequence[str]) -> str:
    """The answer given most often (ties: the first given), as VQA's multiple_choice_answer picks it."""
    counts = Counter(answers)
    return max(answers, key=lambda a: counts[a]) if answers else ""


def caption(rec_id: str, image: str, text, where: str, lang: str | None = None) -> Result:
    text = clean(text)
    if not text:
        return Skip(EMPTY_TEXT, where, "caption")
    return {"id": rec_id, "image": image, "caption": text, "task": "caption", **({"lang": lang} if lang else {})}


def vqa(rec_id: str, image: str, question, answer, where: str) -> Result:
    question, answer = clean(question), clean(answer)
    if not question or not answer:
        return Skip(EMPTY_TEXT, where, "question" if not question else "answer")
    return {"id": rec_id, "image": image, "question": question, "answer": answer, "task": "vqa"}


def box_xywh(box) -> tuple[float, float, float, float] | None:
    """[x, y, w, h] as 4 finite floats, or None."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return None
    x, y, w, h = (float(v) for v in box)
    return (x, y, w, h) if all(abs(v) < float("inf") for v in (x, y, w, h)) else None


def normalized_box(box, width, height, where: str) -> tuple[int, int, int, int] | Skip:
    """A pixel box [x, y, w, h] on a width x height image -> formats' 0..999 box (x1, y1, x2, y2)."""
    xywh = box_xywh(box)
    size_ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (width, height))
    if xywh is None or not size_ok or xywh[2] < 0 or xywh[3] < 0:
        return Skip(BAD_BOX, where, f"box {box!r:.60} on a {width!r:.20}x{height!r:.20} image")
    x, y, w, h = xywh
    if w == 0 or h == 0:
        return Skip(ZERO_AREA_BOX, where, f"box {box!r:.60}")
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return Skip(BAD_BOX, where, f"box {box!r:.60} lies outside the {width}x{height} image")
    norm = formats.normalize_box((x, y, x + w, y + h), width, height)
    if norm[0] >= norm[2] or norm[1] >= norm[3]:
        return Skip(ZERO_AREA_BOX, where, f"box {box!r:.60} is {list(norm)} on the 0..999 grid")
    return norm


def grounded(rec_id: str, image: str, phrase, box, tasks: Sequence[str], where: str, lang: str = "en"):
    """A phrase and its normalized box -> a record of each task (grounding, grounded_caption)."""
    phrase = clean(phrase)
    if not phrase:
        yield Skip(EMPTY_TEXT, where, "phrase")
        return
    for task in tasks:
        suffix = "" if len(tasks) == 1 else f":{task}"
        yield {"id": rec_id + suffix, "image": image, "phrase": phrase, "box": list(box), "task": task, "lang": lang}


def conversation(rec_id: str, images: list[str], messages, where: str) -> Result:
    """A LLaVA conversation record whose images' placeholders lead the turns that show them (LLaVA's own
    preprocessing moves a lone `<image>` to the front of its turn; an image no turn places leads the first)."""
    for m in messages if isinstance(messages, list) else ():
        if isinstance(m, dict) and isinstance(m.get("value"), str) and not m["value"].strip():
            return Skip(EMPTY_TEXT, where, f"an empty {m.get('from')!r} turn")
    try:
        conv = formats.place_images(formats.conversation("conversation", {"conversations": messages}), len(images))
    except errors.BadSample as e:
        return Skip(MALFORMED if e.reason == errors.BAD_ANNOTATION else e.reason, where, e.detail)
    messages = [dict(m) for m in messages]
    if len(images) == 1:
        placed = conv.prefix == ""  # the text places the image itself
        for m in messages:
            if formats.IMAGE in m["value"] or (not placed and m is messages[0]):
                m["value"] = f"{formats.IMAGE}\n" + m["value"].replace(formats.IMAGE, "").strip()
                break
    image = images[0] if len(images) == 1 else images
    return {"id": rec_id, "image": image, "conversations": messages, "task": "conversation"}


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds only what pickle encodes without a global (dicts, lists, tuples, strings, numbers): every class or
    function a file names (os.system, say) is refused before it is looked up, so loading cannot run code (the
    Python docs' "Restricting Globals")."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global '{module}.{name}' refused: only plain data is read")


def load_plain_pickle(path: str):
    """A pickle of plain data, as RefCOCO's refs(*).p are. Python 2 `str`s come back as `str` (UTF-8)."""
    with open(path, "rb") as f:
        try:
            return _decoded(_PlainDataUnpickler(f, encoding="bytes").load())
        except Exception as e:  # a corrupt or hostile pickle fails with almost any exception type
            raise ValueError(f"{path} is not a pickle of plain data: {type(e).__name__}: {e}") from None


def _decoded(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {_decoded(k): _decoded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decoded(v) for v in value)
    return value
