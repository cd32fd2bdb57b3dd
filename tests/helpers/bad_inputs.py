"""Bad and tricky input files, one per kind a real crawl throws at the decoder.

:func:`write_bad_inputs` writes them into a folder and returns
``{file name: expected BadInput.error, or None when it must decode fine}``.
Everything is made with PIL/numpy (the bombs with zlib, so they are real PNGs
that never need their pixels in memory) and is a few KB on disk.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Geometry and colours the tests check the decoded pixels against.
H, W = 120, 160  # most tricky images: 120 rows, 160 columns, left half / right half
EXIF6_H, EXIF6_W = 90, 180  # stored size of the EXIF-orientation-6 JPEG
TINY_SIZE = (40, 100)  # (width, height): one side below min_side=64
BOMB_SIDE = 10_000  # 100 M pixels: above max_pixels=64 M and PIL's own bomb limit
BOMB_SIDE_SMALL = 9_000  # 81 M pixels: above max_pixels=64 M, below PIL's 89 M warning
CMYK_LEFT = (255, 0, 0, 0)  # pure cyan
CMYK_RIGHT = (0, 0, 0, 0)  # white (no ink)
GRAY16_LEFT, GRAY16_RIGHT = 65535, 32768
PALETTE_COLOURS = [(200, 30, 40), (20, 180, 60), (30, 40, 210)]  # index 0, 1, 2
RGBA_OPAQUE = (220, 40, 10, 255)
RGBA_HIDDEN = (10, 200, 30, 0)  # arbitrary colour under full transparency
LA_OPAQUE = (60, 255)
LA_HIDDEN = (0, 0)
EXIF6_MARK = (255, 0, 0)  # top-left 30x30 block of the stored EXIF-6 image
EXIF6_BODY = (0, 0, 255)

EMPTY = "empty.jpg"
TRUNCATED = "truncated.jpg"
RANDOM_BYTES = "random_bytes.png"
TEXT_AS_PNG = "notes.png"
BOMB = "bomb_10000.png"
BOMB_SMALL = "bomb_9000.png"
TINY = "tiny.png"
UPRIGHT = "upright_rgb.jpg"
CMYK = "cmyk.jpg"
GRAY16 = "gray16.png"
PALETTE = "palette.png"
PALETTE_TRNS = "palette_transparent.png"
RGBA = "rgba_transparent.png"
LA = "la_transparent.png"
EXIF6 = "exif_orientation6.jpg"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def one_bit_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit grayscale PNG, built without the pixels in memory
    as an image: the rows are zeros and compress to a few KB."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _halves(mode: str, left, right, size=(W, H)) -> Image.Image:
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def _noise_rgb(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_bad_inputs() -> dict[str, tuple[bytes, str | None]]:
    """``{file name: (file bytes, expected error or None)}``."""
    files: dict[str, tuple[bytes, str | None]] = {}

    files[EMPTY] = (b"", "EmptyFile")

    full = _save(Image.fromarray(_noise_rgb(H, W, 1)), "JPEG", quality=90)
    files[TRUNCATED] = (full[: len(full) // 2], "CorruptImage")

    files[RANDOM_BYTES] = (b"RND" + np.random.default_rng(2).bytes(4000), "NotAnImage")
    files[TEXT_AS_PNG] = (b"this is a text file that someone named .png\n" * 20, "NotAnImage")

    files[BOMB] = (one_bit_png(BOMB_SIDE, BOMB_SIDE), "DecompressionBomb")
    files[BOMB_SMALL] = (one_bit_png(BOMB_SIDE_SMALL, BOMB_SIDE_SMALL), "DecompressionBomb")

    files[TINY] = (_save(Image.new("RGB", TINY_SIZE, (90, 90, 90)), "PNG"), "TooSmall")

    files[UPRIGHT] = (_save(Image.fromarray(_noise_rgb(H, W, 3)), "JPEG", quality=92), None)

    files[CMYK] = (_save(_halves("CMYK", CMYK_LEFT, CMYK_RIGHT), "JPEG", quality=95), None)

    gray16 = np.full((H, W), GRAY16_LEFT, np.uint16)
    gray16[:, W // 2 :] = GRAY16_RIGHT
    img16 = Image.fromarray(gray16)
    assert img16.mode == "I;16", img16.mode
    files[GRAY16] = (_save(img16, "PNG"), None)

    pal = np.zeros((H, W), np.uint8)
    pal[:, W // 3 : 2 * W // 3] = 1
    pal[:, 2 * W // 3 :] = 2
    p_img = Image.fromarray(pal, "P")
    p_img.putpalette([c for rgb in PALETTE_COLOURS for c in rgb])
    files[PALETTE] = (_save(p_img, "PNG"), None)
    # Same image, index 2 fully transparent: the right third must become white.
    files[PALETTE_TRNS] = (_save(p_img, "PNG", transparency=2), None)

    files[RGBA] = (_save(_halves("RGBA", RGBA_OPAQUE, RGBA_HIDDEN), "PNG"), None)
    files[LA] = (_save(_halves("LA", LA_OPAQUE, LA_HIDDEN), "PNG"), None)

    rot = Image.new("RGB", (EXIF6_W, EXIF6_H), EXIF6_BODY)
    rot.paste(EXIF6_MARK, (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    files[EXIF6] = (_save(rot, "JPEG", quality=95, exif=exif.tobytes()), None)
    return files


def write_bad_inputs(folder: Path) -> dict[str, str | None]:
    """Write one file per bad-input kind into ``folder``; return
    ``{file name: expected BadInput.error class, or None if it must decode}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for name, (data, error) in make_bad_inputs().items():
        (folder / name).write_bytes(data)
        expected[name] = error
    return expected


# --- inputs that are not image files at all: the reader must refuse them, fast -----------

SPARSE_SIZE = 1 << 30  # a 1 GiB sparse file: > max_bytes, no disk used
STRIP_SIZE = (2000, 64)  # (width, height): min side 64 passes, aspect ratio 31 does not


def write_hostile_folder(folder: Path) -> dict[str, str | None]:
    """An image folder of hostile inputs plus two good, captioned images.

    Returns ``{image file name: expected BadInput.error, or None if it must be
    written}``: a FIFO (opening it would block forever), a link to
    ``/dev/zero`` (endless), a huge sparse file, a 31:1 strip, and an image
    whose sidecar caption is not UTF-8.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for i in range(2):
        name = f"good_{i}.jpg"
        (folder / name).write_bytes(
            _save(Image.fromarray(_noise_rgb(H, W, 10 + i)), "JPEG", quality=90)
        )
        (folder / f"good_{i}.txt").write_text(f"a good photo number {i}\n", encoding="utf-8")
        expected[name] = None
    os.mkfifo(folder / "pipe.jpg")
    expected["pipe.jpg"] = "NotARegularFile"
    (folder / "zero.jpg").symlink_to("/dev/zero")
    expected["zero.jpg"] = "NotARegularFile"
    with open(folder / "sparse.png", "wb") as fh:
        fh.truncate(SPARSE_SIZE)
    expected["sparse.png"] = "TooLarge"
    (folder / "strip.png").write_bytes(_save(Image.new("RGB", STRIP_SIZE, (9, 99, 199)), "PNG"))
    (folder / "strip.txt").write_text("a long thin strip\n", encoding="utf-8")
    expected["strip.png"] = "BadAspectRatio"
    (folder / "badcap.jpg").write_bytes(
        _save(Image.fromarray(_noise_rgb(H, W, 20)), "JPEG", quality=90)
    )
    (folder / "badcap.txt").write_bytes(b"caf\xe9 au lait \xff\xfe\n")  # Latin-1, not UTF-8
    expected["badcap.jpg"] = "BadCaption"
    return expected
