"""Image decoding: every PIL mode to RGB, bad files by reason, the pixel limit, CLIP normalisation, crops."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ziya_jax.data import errors, images


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB with almost no pixel data behind it."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def reason_of(src, **kw):
    with pytest.raises(errors.BadSample) as e:
        images.open_rgb(src, **kw)
    return e.value


def test_rgb_png_and_array_decode_exactly():
    assert (np.asarray(images.open_rgb(encode(Image.fromarray(RGB)))) == RGB).all()
    assert (np.asarray(images.open_rgb(RGB)) == RGB).all()


def test_grayscale_and_bilevel_become_three_equal_channels():
    grey = RGB[..., 0]
    out = np.asarray(images.open_rgb(encode(Image.fromarray(grey, "L"))))
    assert out.shape == (20, 30, 3) and (out == grey[..., None]).all()
    bits = np.asarray(images.open_rgb(encode(Image.fromarray(grey > 128).convert("1"))))
    assert set(np.unique(bits)) <= {0, 255} and (bits[..., 0] == np.where(grey > 128, 255, 0)).all()


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    out = np.asarray(images.open_rgb(encode(Image.fromarray(values))))
    assert Image.open(io.BytesIO(encode(Image.fromarray(values)))).mode.startswith("I")
    assert list(out[0, :, 0]) == [0, 128, 255, 4] and (out[..., 0] == out[..., 2]).all()


def test_palette_keeps_colours_and_transparency_becomes_white():
    pal = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    expected = np.asarray(pal.convert("RGB"))
    assert (np.asarray(images.open_rgb(encode(pal))) == expected).all()
    index = np.asarray(pal)
    out = np.asarray(images.open_rgb(encode(pal, transparency=int(index[0, 0]))))
    see_through = index == index[0, 0]
    assert (out[see_through] == 255).all() and (out[~see_through] == expected[~see_through]).all()


def test_alpha_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = [[0, 255], [128, 255]]
    out = np.asarray(images.open_rgb(encode(Image.fromarray(rgba, "RGBA")))).astype(int)
    assert (out[0, 0] == 255).all() and list(out[0, 1]) == [10, 200, 30]
    blend = np.array([10, 200, 30]) * 128 / 255 + 255 * 127 / 255
    assert np.abs(out[1, 0] - blend).max() <= 1
    la = np.asarray(images.open_rgb(encode(Image.fromarray(rgba[..., [1, 3]], "LA"))))
    assert (la[0, 0] == 255).all() and (la[0, 1] == 200).all()


def test_cmyk_jpeg_becomes_rgb():
    smooth = np.repeat(np.linspace(0, 255, 30, dtype=np.uint8)[None, :, None], 20, 0).repeat(3, 2)
    data = encode(Image.fromarray(smooth).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = images.open_rgb(data)
    assert out.mode == "RGB" and np.abs(np.asarray(out).astype(int) - smooth).mean() < 8


def test_bad_images_are_named_by_reason(tmp_path):
    png, jpg = encode(Image.fromarray(RGB)), encode(Image.fromarray(RGB), "JPEG")
    assert reason_of(b"").reason == errors.EMPTY_IMAGE
    assert reason_of(b"definitely not an image" * 8).reason == errors.CORRUPT_IMAGE
    assert reason_of(png[: len(png) // 2]).reason == errors.TRUNCATED_IMAGE
    assert reason_of(jpg[: len(jpg) // 2]).reason == errors.TRUNCATED_IMAGE
    assert reason_of(np.zeros((4, 4), np.uint8)).reason == errors.CORRUPT_IMAGE
    missing = reason_of(str(tmp_path / "gone.png"))
    assert missing.reason == errors.MISSING_FILE and "gone.png" in str(missing)
    assert reason_of(str(tmp_path)).reason == errors.UNREADABLE_FILE
    (tmp_path / "zero.jpg").write_bytes(b"")
    empty = reason_of(str(tmp_path / "zero.jpg"))
    assert empty.reason == errors.EMPTY_IMAGE and "zero.jpg" in str(empty)


@pytest.mark.parametrize("declared,limit", [((60000, 60000), images.DEFAULT_MAX_PIXELS), ((3000, 3000), 1_000_000)])
def test_decompression_bombs_are_refused_from_the_header(declared, limit):
    # The file holds 64 bytes of pixel data: decoding it would fail as a truncated image, so this reason shows
    # that the refusal came from the header alone.
    assert reason_of(png_header_only(*declared), max_pixels=limit).reason == errors.DECOMPRESSION_BOMB
    # A real image just over the limit is refused too; one within it decodes.
    assert reason_of(encode(Image.fromarray(RGB)), max_pixels=599).reason == errors.DECOMPRESSION_BOMB
    assert images.open_rgb(encode(Image.fromarray(RGB)), max_pixels=600).size == (30, 20)


def test_normalisation_is_clip_mean_std_of_x_over_255():
    flat = np.full((8, 8, 3), [0, 128, 255], np.uint8)
    out = images.to_pixels(Image.fromarray(flat), 16)
    expected = (np.array([0, 128, 255]) / 255 - images.CLIP_MEAN) / images.CLIP_STD
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert np.abs(out - expected).max() < 1e-5
    im = Image.fromarray(RGB)
    bicubic = np.asarray(im.resize((24, 24), Image.Resampling.BICUBIC)).astype(np.float64)
    assert np.abs(images.to_pixels(im, 24) - (bicubic / 255 - images.CLIP_MEAN) / images.CLIP_STD).max() < 1e-5
    assert (images.denormalize(images.to_pixels(im, 24)) == bicubic).all()


@pytest.mark.parametrize("size", [(640, 480), (1000, 10), (10, 1000)])
def test_random_resized_crop_stays_inside_and_in_range(size):
    rng = np.random.default_rng(1)
    w, h = size
    for _ in range(200):
        x0, y0, x1, y1 = images.random_resized_crop_box(w, h, rng, scale=(0.5, 1.0))
        assert 0 <= x0 < x1 <= w + 1e-6 and 0 <= y0 < y1 <= h + 1e-6
        if size == (640, 480):  # no fallback needed here
            assert 0.5 - 1e-6 <= (x1 - x0) * (y1 - y0) / (w * h) <= 1 + 1e-6
            assert 3 / 4 - 1e-6 <= (x1 - x0) / (y1 - y0) <= 4 / 3 + 1e-6
