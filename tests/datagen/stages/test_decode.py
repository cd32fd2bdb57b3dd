"""datagen.io and datagen.images on every bad-input kind, and the decode op's JPEG pass-through."""

from __future__ import annotations

import io
import math
import struct

import numpy as np
import pytest
from PIL import Image

from datagen.images import decode_image
from datagen.io import BadInput, DecodeParams, read_bytes
from datagen.stages.decode import DecodeStage, DecodeStageParams
from tests.helpers.bad_inputs import (
    BOMB,
    CMYK,
    EXIF6,
    EXIF6_BODY,
    EXIF6_H,
    EXIF6_MARK,
    EXIF6_W,
    GRAY16,
    GRAY16_LEFT,
    GRAY16_RIGHT,
    LA,
    LA_OPAQUE,
    PALETTE,
    PALETTE_COLOURS,
    PALETTE_TRNS,
    RGBA,
    RGBA_OPAQUE,
    TINY,
    UPRIGHT,
    H,
    W,
    make_bad_inputs,
    write_bad_inputs,
)

CASES = make_bad_inputs()
BAD = sorted(name for name, (_, error) in CASES.items() if error is not None)
GOOD = sorted(name for name, (_, error) in CASES.items() if error is None)
WHITE = (255, 255, 255)


def decode_op(**params):
    """The decode stage's per-row function (raises BadInput to reject the row)."""
    return DecodeStage(DecodeStageParams(**params)).label


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    expected = write_bad_inputs(root)
    return root, expected


def _decode(folder, name: str, **params) -> np.ndarray:
    root, _ = folder
    return decode_image((root / name).read_bytes(), DecodeParams(**params))


def _region(arr: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return arr[rows, cols].reshape(-1, 3)


# --- the helper itself -------------------------------------------------------------------


def test_write_bad_inputs_writes_every_file(folder):
    root, expected = folder
    assert set(expected) == set(CASES)
    assert sorted(p.name for p in root.iterdir()) == sorted(expected)
    for name, (data, error) in CASES.items():
        assert (root / name).read_bytes() == data
        assert expected[name] == error
    kinds = set(expected.values())
    assert kinds == {
        None,
        "EmptyFile",
        "CorruptImage",
        "NotAnImage",
        "DecompressionBomb",
        "TooSmall",
    }
    # The bombs are real, tiny on disk, and claim more pixels than max_pixels.
    for name in (BOMB, "bomb_9000.png"):
        assert (root / name).stat().st_size < 50_000
        header = (root / name).read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
        w, h = struct.unpack(">II", header[16:24])
        assert w * h > DecodeParams().max_pixels


def test_every_valid_file_has_a_pixel_check():
    checked = {UPRIGHT, CMYK, GRAY16, PALETTE, PALETTE_TRNS, RGBA, LA, EXIF6}
    assert set(GOOD) == checked


# --- failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_its_error_class(folder, name):
    root, expected = folder
    with pytest.raises(BadInput) as info:
        decode_image((root / name).read_bytes())
    assert info.value.error == expected[name]
    assert info.value.message
    assert str(info.value).startswith(expected[name] + ": ")


@pytest.mark.parametrize("name", GOOD)
def test_valid_input_decodes_to_uint8_rgb(folder, name):
    arr = _decode(folder, name)
    assert arr.dtype == np.uint8
    assert arr.ndim == 3 and arr.shape[2] == 3
    assert arr.flags.writeable and arr.flags.c_contiguous


def test_too_small_respects_min_side(folder):
    # tiny.png is 40 wide and 100 high: fine once min_side allows 40.
    arr = _decode(folder, TINY, min_side=40)
    assert arr.shape == (100, 40, 3)
    with pytest.raises(BadInput) as info:
        _decode(folder, TINY, min_side=41)
    assert info.value.error == "TooSmall"


def test_max_pixels_is_the_bomb_limit(folder):
    pixels = H * W
    assert _decode(folder, PALETTE, max_pixels=pixels).shape == (H, W, 3)
    with pytest.raises(BadInput) as info:
        _decode(folder, PALETTE, max_pixels=pixels - 1)
    assert info.value.error == "DecompressionBomb"


def test_max_bytes(folder):
    root, _ = folder
    size = (root / PALETTE).stat().st_size
    assert _decode(folder, PALETTE, max_bytes=size).shape == (H, W, 3)
    with pytest.raises(BadInput) as info:
        _decode(folder, PALETTE, max_bytes=size - 1)
    assert info.value.error == "TooLarge"


def test_truncated_file_is_not_filled_with_gray(folder):
    # Even if some other code enabled LOAD_TRUNCATED_IMAGES, decode must refuse.
    from PIL import ImageFile

    root, _ = folder
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(BadInput) as info:
            decode_image((root / "truncated.jpg").read_bytes())
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
    assert info.value.error == "CorruptImage"


# --- valid but tricky: exact pixels ------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb(folder):
    arr = _decode(folder, CMYK).astype(int)
    assert arr.shape == (H, W, 3)
    cyan = _region(arr, slice(10, H - 10), slice(10, W // 2 - 10))
    white = _region(arr, slice(10, H - 10), slice(W // 2 + 10, W - 10))
    assert np.abs(cyan - (0, 255, 255)).max() <= 3
    assert np.abs(white - WHITE).max() <= 3


def test_16bit_gray_is_scaled_not_clipped(folder):
    root, _ = folder
    with Image.open(root / GRAY16) as im:
        assert im.mode == "I;16"  # really a 16-bit input
    arr = _decode(folder, GRAY16)
    left, right = arr[:, : W // 2], arr[:, W // 2 :]
    assert (left == round(GRAY16_LEFT / 65535 * 255)).all()
    assert (left == 255).all()
    assert (right == round(GRAY16_RIGHT / 65535 * 255)).all()
    assert (right == 128).all()


def test_16bit_dark_values_are_not_read_as_8bit(tmp_path):
    # A dark 16-bit image (all values <= 255) is still 16-bit: 255/65535 -> 1.
    data = np.full((80, 80), 255, np.uint16)
    data[:, 40:] = 0
    buf = io.BytesIO()
    Image.fromarray(data).save(buf, "PNG")
    arr = decode_image(buf.getvalue())
    assert (arr[:, :40] == 1).all()
    assert (arr[:, 40:] == 0).all()


def test_palette_png(folder):
    arr = _decode(folder, PALETTE)
    thirds = [slice(0, W // 3), slice(W // 3, 2 * W // 3), slice(2 * W // 3, W)]
    for cols, colour in zip(thirds, PALETTE_COLOURS, strict=True):
        assert (_region(arr, slice(None), cols) == colour).all()


def test_palette_png_with_transparency_becomes_white(folder):
    arr = _decode(folder, PALETTE_TRNS)
    assert (_region(arr, slice(None), slice(0, W // 3)) == PALETTE_COLOURS[0]).all()
    assert (_region(arr, slice(None), slice(W // 3, 2 * W // 3)) == PALETTE_COLOURS[1]).all()
    # index 2 is transparent: its blue must not leak through
    assert (_region(arr, slice(None), slice(2 * W // 3, W)) == WHITE).all()


def test_rgba_transparent_region_becomes_white(folder):
    arr = _decode(folder, RGBA)
    assert (_region(arr, slice(None), slice(0, W // 2)) == RGBA_OPAQUE[:3]).all()
    assert (_region(arr, slice(None), slice(W // 2, W)) == WHITE).all()


def test_rgba_partial_alpha_is_composited_on_white():
    img = Image.new("RGBA", (80, 80), (0, 0, 0, 128))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    arr = decode_image(buf.getvalue()).astype(int)
    # 0 * a + 255 * (1 - a) with a = 128/255
    assert np.abs(arr - round(255 * (1 - 128 / 255))).max() <= 1


def test_la_image(folder):
    arr = _decode(folder, LA)
    grey = (LA_OPAQUE[0],) * 3
    assert (_region(arr, slice(None), slice(0, W // 2)) == grey).all()
    assert (_region(arr, slice(None), slice(W // 2, W)) == WHITE).all()


def test_exif_orientation_6_is_rotated_upright(folder):
    root, _ = folder
    with Image.open(root / EXIF6) as im:
        assert im.size == (EXIF6_W, EXIF6_H)
        assert im.getexif().get(0x0112) == 6
        stored = np.asarray(im.convert("RGB"))
    arr = _decode(folder, EXIF6)
    assert stored.shape == (EXIF6_H, EXIF6_W, 3)
    assert arr.shape == (EXIF6_W, EXIF6_H, 3)
    # Orientation 6: turn the stored pixels 90 degrees clockwise to display them.
    assert np.array_equal(arr, np.rot90(stored, k=-1))
    # The mark stored top-left is displayed top-right.
    top_right = arr[2:28, EXIF6_H - 28 : EXIF6_H - 2].reshape(-1, 3).astype(int)
    top_left = arr[2:28, 2:28].reshape(-1, 3).astype(int)
    assert np.abs(top_right - EXIF6_MARK).max() <= 8
    assert np.abs(top_left - EXIF6_BODY).max() <= 8


def test_upright_rgb_jpeg_matches_pil(folder):
    root, _ = folder
    with Image.open(root / UPRIGHT) as im:
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(_decode(folder, UPRIGHT), expected)


# --- read_bytes --------------------------------------------------------------------------


def test_read_bytes_whole_file_and_range(tmp_path):
    data = bytes(range(256)) * 4
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert read_bytes(str(path)) == data
    assert read_bytes(str(path), 10, 25) == data[10:35]
    assert read_bytes(str(path), 1000) == data[1000:]
    assert read_bytes(str(path), 0, 0) == b""
    assert read_bytes(f"file://{path}", 3, 4) == data[3:7]


def test_read_bytes_missing_file(tmp_path):
    with pytest.raises(BadInput) as info:
        read_bytes(str(tmp_path / "nope.jpg"))
    assert info.value.error == "MissingFile"
    assert "nope.jpg" in info.value.message


def test_read_bytes_directory(tmp_path):
    with pytest.raises(BadInput) as info:
        read_bytes(str(tmp_path))
    assert info.value.error == "NotAFile"


# --- the decode op -----------------------------------------------------------------------


def _row(path, caption="a caption", offset=None, size=None):
    return {
        "key": "k",
        "uri": str(path),
        "caption": caption,
        "byte_offset": offset,
        "byte_size": size,
    }


def test_decode_op_keeps_original_upright_rgb_jpeg(folder):
    root, _ = folder
    data = (root / UPRIGHT).read_bytes()
    out = decode_op()(_row(root / UPRIGHT))
    assert out["jpg"] == data
    assert out["image"].shape == (H, W, 3)
    assert out["txt"] == b"a caption"
    assert out["meta"] == {
        "caption": "a caption",
        "width": W,
        "height": H,
        "source_width": W,  # the file's size before max_side (what scene intrinsics refer to)
        "source_height": H,
    }


@pytest.mark.parametrize("name", [EXIF6, CMYK, PALETTE, RGBA, GRAY16])
def test_decode_op_reencodes_everything_else(folder, name):
    root, _ = folder
    data = (root / name).read_bytes()
    out = decode_op()(_row(root / name))
    assert out["jpg"] != data
    assert out["jpg"][:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(out["jpg"])) as im:
        assert im.mode == "RGB"
        assert im.getexif().get(0x0112, 1) == 1
        assert im.size == (out["image"].shape[1], out["image"].shape[0])
        reread = np.asarray(im).astype(int)
    assert np.abs(reread - out["image"].astype(int)).mean() < 3


def test_decode_op_exif6_output_is_upright(folder):
    root, _ = folder
    out = decode_op()(_row(root / EXIF6))
    assert out["image"].shape == (EXIF6_W, EXIF6_H, 3)
    assert out["meta"]["width"] == EXIF6_H and out["meta"]["height"] == EXIF6_W


def test_decode_op_gray_jpeg_is_reencoded_as_rgb(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.new("L", (100, 90), 77).save(path, quality=95)
    out = decode_op()(_row(path))
    assert out["jpg"] != path.read_bytes()
    with Image.open(io.BytesIO(out["jpg"])) as im:
        assert im.mode == "RGB"


def test_decode_op_resizes_and_reencodes(folder):
    root, _ = folder
    # min_side applies to the resized image (80x60), so it is lowered with max_side.
    out = decode_op(max_side=80, min_side=32)(_row(root / UPRIGHT))
    assert out["image"].shape == (60, 80, 3)
    assert out["jpg"] != (root / UPRIGHT).read_bytes()
    with Image.open(io.BytesIO(out["jpg"])) as im:
        assert im.size == (80, 60)


def test_decode_op_reads_a_byte_range(tmp_path, folder):
    root, _ = folder
    data = (root / UPRIGHT).read_bytes()
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"x" * 100 + data + b"y" * 50)
    out = decode_op()(_row(blob, offset=100, size=len(data)))
    assert out["jpg"] == data
    # NaN offsets (how Ray fills a missing int) mean "the whole file"
    whole = decode_op()(_row(root / UPRIGHT, offset=math.nan, size=math.nan))
    assert whole["jpg"] == data


def test_decode_op_missing_caption_and_rejects(folder, tmp_path):
    root, _ = folder
    out = decode_op()(_row(root / PALETTE, caption=None))
    assert out["txt"] == b"" and out["meta"]["caption"] == ""
    with pytest.raises(BadInput) as info:
        decode_op()(_row(root / TINY))
    assert info.value.error == "TooSmall"
    with pytest.raises(BadInput) as info:
        decode_op()(_row(tmp_path / "gone.jpg"))
    assert info.value.error == "MissingFile"


def test_non_image_is_quarantined_even_after_ultralytics_patched_pil():
    """ultralytics replaces PIL.Image.open with one that pip-installs a HEIF
    plugin on unknown files; decode must not go through it."""
    import ultralytics.utils.patches  # noqa: F401  (applies the patch)
    from PIL import Image

    assert Image.open.__module__ == "ultralytics.utils.patches"
    with pytest.raises(BadInput) as info:
        decode_image(b"definitely not an image" * 10)
    assert info.value.error == "NotAnImage"
