"""Image decoding and preprocessing: bytes/path/array -> RGB -> bicubic resize -> CLIP normalisation.

Matches BLIP-2's eval transform (resize to a square, no aspect-preserving crop, x/255, CLIP mean/std).
Anything that cannot be turned into an RGB image raises `BadSample` with a reason code; the size declared in
the header is checked against a pixel limit before any pixel is decoded, so a decompression bomb costs
a header read, not gigabytes; a file's size is checked before it is read.
"""

from __future__ import annotations

import io
import os
import stat

import numpy as np
from PIL import Image

from ziya_jax.data import errors

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# x/255 then (x - mean)/std, folded into one multiply-add per pixel.
_SCALE = (1.0 / (255.0 * CLIP_STD)).astype(np.float32)
_OFFSET = (CLIP_MEAN / CLIP_STD).astype(np.float32)
# 64 megapixels (e.g. 8000x8000) is far above any training image and far below what would exhaust memory.
DEFAULT_MAX_PIXELS = 64_000_000
# Image files are read whole: a file above this (an uncompressed 64-megapixel image is 192 MB) is refused by its
# size, before it is read.
DEFAULT_MAX_BYTES = 256 * 2**20
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_source(src, name: str = "", max_bytes: int = DEFAULT_MAX_BYTES) -> bytes | np.ndarray:
    """bytes stay bytes, an array stays an array, a str/PathLike is read from disk: only a regular file (a
    device such as /dev/zero, or a pipe, would never end) of at most max_bytes, both known before reading."""
    if isinstance(src, (bytes, np.ndarray)):
        return src
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise errors.BadSample(errors.UNREADABLE_FILE, "not a regular file", name or path)
            if info.st_size > max_bytes:
                raise errors.BadSample(errors.FILE_TOO_LARGE, f"{info.st_size} bytes > {max_bytes}", name or path)
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:  # it grew after the check
                raise errors.BadSample(errors.FILE_TOO_LARGE, f"more than {max_bytes} bytes", name or path)
            return data
        except FileNotFoundError:
            raise errors.BadSample(errors.MISSING_FILE, path, name or path) from None
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
            raise errors.BadSample(errors.UNREADABLE_FILE, f"{path}: {e}", name or path) from None
    raise errors.BadSample(errors.BAD_ANNOTATION, f"image of type {type(src).__name__}", name)


def open_rgb(
    src, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "", max_bytes: int = DEFAULT_MAX_BYTES
) -> Image.Image:
    """Any supported image (bytes, path or uint8 array [H, W, 3]) as a decoded RGB PIL image."""
    name = name or (os.fspath(src) if isinstance(src, (str, os.PathLike)) else "")
    data = read_source(src, name, max_bytes)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 3 or data.shape[-1] != 3:
            raise errors.BadSample(
                errors.CORRUPT_IMAGE, f"array {data.dtype}{list(data.shape)}, want uint8 [H,W,3]", name
            )
        return Image.fromarray(data)
    if not data:
        raise errors.BadSample(errors.EMPTY_IMAGE, "0 bytes", name)
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise errors.BadSample(errors.DECOMPRESSION_BOMB, str(e), name) from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise errors.BadSample(_decode_reason(e), str(e), name) from None
    w, h = im.size
    if w * h > max_pixels or w <= 0 or h <= 0:
        raise errors.BadSample(errors.DECOMPRESSION_BOMB, f"declared {w}x{h} > {max_pixels} pixels", name)
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise errors.BadSample(_decode_reason(e), str(e), name) from None
    return to_rgb(im)


def _decode_reason(e: Exception) -> str:
    """PIL says "truncated" (in several spellings) when the data stops early; anything else is corrupt."""
    return errors.TRUNCATED_IMAGE if "truncat" in str(e).lower() else errors.CORRUPT_IMAGE


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any PIL mode. 16-bit grey is scaled to 8 bits (PIL's own convert would clip it to white);
    transparency is composited over white (a plain convert keeps whatever colour hides under alpha 0)."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT:
        grey = np.asarray(im).astype(np.float32) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[float, float, float, float]:
    """A crop (x0, y0, x1, y1) covering `scale` of the area with aspect ratio in `ratio` (BLIP-2's train
    crop uses scale (0.5, 1)); falls back to the largest centred crop within `ratio` after 10 misses."""
    area = width * height
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w, h = np.sqrt(target * aspect), np.sqrt(target / aspect)
        if w <= width and h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return float(x0), float(y0), float(x0 + w), float(y0 + h)
    aspect = np.clip(width / height, *ratio)
    w, h = (width, width / aspect) if width / height <= aspect else (height * aspect, height)
    x0, y0 = (width - w) / 2, (height - h) / 2
    return float(x0), float(y0), float(x0 + w), float(y0 + h)


def to_pixels(im: Image.Image, size: int, crop: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """RGB image (optionally a crop of it) -> bicubic size x size -> CLIP-normalised float32 [size, size, 3]."""
    if crop is not None or im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC, box=crop)
    return np.asarray(im, dtype=np.float32) * _SCALE - _OFFSET


def denormalize(pixels: np.ndarray) -> np.ndarray:
    """CLIP-normalised float pixels -> uint8 RGB (for looking at batches)."""
    return np.clip(np.rint((pixels + _OFFSET) / _SCALE), 0, 255).astype(np.uint8)


def load_image(path: str, size: int) -> np.ndarray:
    """An image file -> CLIP-normalised [size, size, 3]; a .npy file is taken as already-normalised pixels
    ([3, H, W] or [H, W, 3], as HF pixel_values or ziya_jax's layout), and must be finite. Raises ValueError."""
    if path.endswith(".npy"):
        try:
            pixels = np.load(path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a numeric .npy array ({e})") from None
        if pixels.ndim == 4 and pixels.shape[0] == 1:
            pixels = pixels[0]
        if pixels.ndim == 3 and pixels.shape[0] == 3:
            pixels = pixels.transpose(1, 2, 0)
        if pixels.shape != (size, size, 3):
            raise ValueError(
                f"{path}: pixels of shape {pixels.shape}, the model wants ({size}, {size}, 3) or (3, {size}, {size})"
            )
        if not np.isfinite(pixels).all():
            raise ValueError(f"{path}: {int((~np.isfinite(pixels)).sum())} pixel values are NaN or infinite")
        return pixels
    try:
        return to_pixels(open_rgb(path), size)
    except errors.BadSample as e:
        raise ValueError(f"cannot read image {e}") from None
