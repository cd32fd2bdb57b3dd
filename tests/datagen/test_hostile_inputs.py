"""Hostile inputs: none may hang the job, exhaust memory or refuse the whole run.

Real files throughout: a FIFO, /dev/zero, a 1 GiB sparse file, sidecars that
are not UTF-8, tars written with ``tarfile`` and then truncated or corrupted,
parquet manifests with wrong column types. Each bad input becomes one
quarantined key whose reason names the file; everything else is processed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.spec import AbstractFileSystem
from PIL import Image

from datagen import io as datagen_io
from datagen.images import decode_image
from datagen.io import BadInput, DecodeParams, read_bytes
from datagen.schema import KEY_PATTERN
from datagen.sources.base import MANIFEST_SCHEMA, SourceError, dedupe_keys
from datagen.sources.folders import image_folder
from datagen.sources.parquet import parquet_manifest
from datagen.sources.webdataset import tar_key, webdataset_shards
from datagen.stages.decode import DecodeStage, DecodeStageParams
from tests.helpers.bad_inputs import SPARSE_SIZE, one_bit_png, write_hostile_folder


def decode_op(**params):
    """The decode stage's per-row function (raises BadInput to reject the row)."""
    return DecodeStage(DecodeStageParams(**params)).label


def _jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(size: tuple[int, int], colour=(9, 99, 199)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _row(uri, **extra) -> dict:
    return {
        "key": "k",
        "uri": str(uri),
        "caption": "c",
        "byte_offset": None,
        "byte_size": None,
        **extra,
    }


def _error(fn, *args, **kwargs) -> BadInput:
    with pytest.raises(BadInput) as info:
        fn(*args, **kwargs)
    return info.value


# --- item 2: only regular files, size capped before reading, every read bounded in time --


@pytest.mark.timeout(10)
def test_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    exc = _error(read_bytes, str(fifo))
    assert exc.error == "NotARegularFile" and "FIFO" in exc.message and str(fifo) in exc.message
    assert _error(decode_op(), _row(fifo)).error == "NotARegularFile"


@pytest.mark.timeout(10)
def test_fifo_swapped_in_after_stat_cannot_block(tmp_path, monkeypatch):
    """A path that was a regular file at stat time and is a FIFO at open time:
    the open does not block and the open file is checked again."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    regular = os.stat(__file__)
    monkeypatch.setattr(datagen_io.os, "stat", lambda path, *a, **k: regular)
    assert _error(read_bytes, str(fifo), timeout_s=None).error == "NotARegularFile"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("link", [False, True])
def test_char_device_is_refused(tmp_path, link):
    uri = "/dev/zero"
    if link:
        (tmp_path / "zero.jpg").symlink_to("/dev/zero")
        uri = str(tmp_path / "zero.jpg")
    exc = _error(read_bytes, uri)
    assert exc.error == "NotARegularFile" and "character device" in exc.message
    assert _error(decode_op(), _row(uri)).error == "NotARegularFile"


@pytest.mark.timeout(10)
def test_sparse_file_is_refused_before_reading(tmp_path):
    sparse = tmp_path / "sparse.png"
    with open(sparse, "wb") as fh:
        fh.truncate(SPARSE_SIZE)
    start = time.perf_counter()
    exc = _error(read_bytes, str(sparse), max_bytes=10_000_000)
    assert exc.error == "TooLarge" and str(SPARSE_SIZE) in exc.message
    assert _error(decode_op(), _row(sparse)).error == "TooLarge"  # default cap: 200 MB
    # A byte range is capped by its own size, and must lie inside the file.
    assert read_bytes(str(sparse), SPARSE_SIZE - 8, 8) == b"\0" * 8
    assert _error(read_bytes, str(sparse), 0, 500_000_000).error == "TooLarge"
    exc = _error(read_bytes, str(sparse), SPARSE_SIZE - 8, 16)
    assert exc.error == "BadByteRange" and "past the end" in exc.message
    assert _error(read_bytes, str(sparse), -1, 4).error == "BadByteRange"
    assert time.perf_counter() - start < 2.0  # nothing of the 1 GiB was read


class _HangingFS(AbstractFileSystem):
    """A store whose ``info`` or reads never return until released."""

    protocol = "onegenhang"
    release = threading.Event()
    hang_in = "read"

    def info(self, path, **kwargs):
        if self.hang_in == "info":
            self.release.wait()
        return {"name": path, "type": "file", "size": 10}

    def _open(self, path, mode="rb", **kwargs):
        release = self.release

        class _Blocking(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def read(self, n=-1) -> bytes:
                release.wait()
                return b""

        return _Blocking()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("hang_in", ["info", "read"])
def test_a_read_that_never_returns_times_out(hang_in, monkeypatch):
    fsspec.register_implementation(_HangingFS.protocol, _HangingFS, clobber=True)
    monkeypatch.setattr(_HangingFS, "hang_in", hang_in)
    monkeypatch.setattr(_HangingFS, "release", threading.Event())
    try:
        start = time.perf_counter()
        exc = _error(read_bytes, "onegenhang://bucket/x.jpg", timeout_s=0.3)
        assert exc.error == "ReadTimeout" and "onegenhang://bucket/x.jpg" in exc.message
        assert time.perf_counter() - start < 2.0
        exc = _error(decode_op(read_timeout_s=0.3), _row("onegenhang://bucket/y.jpg"))
        assert exc.error == "ReadTimeout"
    finally:
        _HangingFS.release.set()


def test_read_timeout_keeps_normal_reads(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc" * 1000)
    assert read_bytes(str(path), timeout_s=5) == b"abc" * 1000
    assert read_bytes(str(path), 3, 3, timeout_s=None) == b"abc"


def test_fsspec_store_reads_are_checked_by_info(tmp_path):
    """Object stores have no stat: fsspec's ``info`` type and size stand in."""
    fs = fsspec.filesystem("memory")
    fs.pipe("/onegen-hostile/a.jpg", b"0123456789")
    fs.mkdir("/onegen-hostile/dir.jpg")
    try:
        assert read_bytes("memory://onegen-hostile/a.jpg", 2, 3) == b"234"
        assert _error(read_bytes, "memory://onegen-hostile/a.jpg", 8, 4).error == "BadByteRange"
        assert _error(read_bytes, "memory://onegen-hostile/a.jpg", max_bytes=5).error == "TooLarge"
        assert _error(read_bytes, "memory://onegen-hostile/dir.jpg").error == "NotAFile"
        assert _error(read_bytes, "memory://onegen-hostile/none.jpg").error == "MissingFile"
    finally:
        fs.rm("/onegen-hostile", recursive=True)


# --- item 5: geometry judged on what is written ------------------------------------------


def test_long_strip_is_refused_before_decoding():
    """64 x 100000 used to pass min_side and become a 1 x 1024 sample."""
    data = one_bit_png(64, 100_000)
    exc = _error(decode_image, data)
    assert exc.error == "BadAspectRatio" and "64x100000" in exc.message
    assert _error(decode_image, one_bit_png(100_000, 64)).error == "BadAspectRatio"
    assert decode_image(one_bit_png(64, 256)).shape == (256, 64, 3)  # exactly 4:1 passes
    assert decode_image(data, DecodeParams(max_aspect_ratio=None)).shape == (100_000, 64, 3)


def test_decode_op_checks_aspect_ratio_and_min_side_after_resizing(tmp_path):
    strip = tmp_path / "strip.png"
    strip.write_bytes(_png((2000, 64)))
    assert _error(decode_op(max_side=1024), _row(strip)).error == "BadAspectRatio"
    # With the ratio allowed, the resize to 1024 x 33 still fails: min_side is checked after it.
    exc = _error(decode_op(max_side=1024, max_aspect_ratio=40), _row(strip))
    assert exc.error == "TooSmall" and "1024x33 after resizing" in exc.message
    # 3:1 passes the ratio, but max_side=150 leaves a 50 px short side < min_side=64.
    wide = tmp_path / "wide.png"
    wide.write_bytes(_png((300, 100)))
    exc = _error(decode_op(max_side=150, min_side=64), _row(wide))
    assert exc.error == "TooSmall" and "150x50" in exc.message and "after resizing" in exc.message
    assert decode_op(max_side=300)(_row(wide))["image"].shape == (100, 300, 3)


def test_normal_two_to_one_jpeg_is_passed_through_unchanged(tmp_path):
    path = tmp_path / "wide.jpg"
    path.write_bytes(_jpeg(1, (256, 128)))
    out = decode_op(max_side=1024)(_row(path))
    assert out["jpg"] == path.read_bytes() and out["image"].shape == (128, 256, 3)


# --- item 4a: image folders ---------------------------------------------------------------


@pytest.mark.timeout(20)
def test_image_folder_quarantines_bad_sidecars_and_keeps_the_rest(tmp_path):
    expected = write_hostile_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "fifocap.jpg").write_bytes(_jpeg(3))
    os.mkfifo(tmp_path / "imgs" / "fifocap.txt")  # a FIFO sidecar must not block the driver
    rows = {Path(r["uri"]).name: r for r in image_folder(str(tmp_path / "imgs")).to_pylist()}
    assert set(rows) == set(expected) | {"fifocap.jpg"}
    bad = rows["badcap.jpg"]["source_error"]
    assert bad.startswith("BadCaption: ") and str(tmp_path / "imgs" / "badcap.txt") in bad
    assert "UTF-8" in bad and rows["badcap.jpg"]["caption"] is None
    assert rows["fifocap.jpg"]["source_error"].startswith("BadCaption: ")
    assert "not a regular file" in rows["fifocap.jpg"]["source_error"]
    assert rows["good_0.jpg"]["source_error"] is None
    assert rows["good_0.jpg"]["caption"] == "a good photo number 0"
    exc = _error(decode_op(), rows["badcap.jpg"])
    assert exc.error == "BadCaption" and "badcap.txt" in exc.message
    assert decode_op()(rows["good_0.jpg"])["txt"] == b"a good photo number 0"


def test_non_utf8_file_name_is_quarantined(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "ok.jpg").write_bytes(_jpeg(4))
    bad_name = os.fsdecode(b"caf\xe9.jpg")
    (root / bad_name).write_bytes(_jpeg(5))
    rows = image_folder(str(root)).to_pylist()
    assert len(rows) == 2
    errors = sorted(r["source_error"] or "" for r in rows)
    assert errors[0] == "" and errors[1].startswith("BadFileName: ") and "caf\\xe9.jpg" in errors[1]


# --- item 4b-d: WebDataset tars -----------------------------------------------------------


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def _set_size(data: bytearray, header: int, size: int) -> None:
    """Rewrite a header's size field (octal, or base-256 when huge) and its checksum."""
    field = (b"\x80" + size.to_bytes(11, "big")) if size >= 8**11 else b"%011o\0" % size
    data[header + 124 : header + 136] = field
    data[header + 148 : header + 156] = b" " * 8
    data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])


def _samples(*stems: str, seed: int = 0) -> list[tuple[str, bytes]]:
    out = []
    for i, stem in enumerate(stems):
        out += [(f"{stem}.jpg", _jpeg(seed + i)), (f"{stem}.txt", f"caption of {stem}".encode())]
    return out


def _prefix(path: Path) -> str:
    name = path.name.removesuffix(".tar").replace("-", "_")
    return f"{name}_{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"


def _rows(path: Path) -> dict[str, dict]:
    table = webdataset_shards(str(path))
    assert table.schema == MANIFEST_SCHEMA
    return {r["key"].removeprefix(_prefix(path) + "-"): r for r in table.to_pylist()}


def _assert_good(rows: dict[str, dict], *suffixes: str) -> None:
    """The rows decode, with their own caption (``caption of <stem>``)."""
    for suffix in suffixes:
        row = rows[suffix]
        assert row["source_error"] is None, row
        out = decode_op()(row)
        assert out["txt"].startswith(b"caption of ") and out["image"].shape == (80, 96, 3)


def broken_tars(folder: Path) -> dict[str, dict[str, str | None]]:
    """Tars broken in each way; ``{tar name: {key suffix: expected error or None}}``."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, dict[str, str | None]] = {}

    members = _write_tar(folder / "truncated.tar", _samples("t0", "t1", "t2"))
    data = (folder / "truncated.tar").read_bytes()
    cut = members["t1.jpg"].offset_data + 100  # in the middle of t1.jpg's data
    (folder / "truncated.tar").write_bytes(data[:cut])
    expected["truncated.tar"] = {"t0": None, "t1": "TruncatedTar"}

    members = _write_tar(folder / "cut_header.tar", _samples("h0", "h1"))
    data = (folder / "cut_header.tar").read_bytes()
    (folder / "cut_header.tar").write_bytes(data[: members["h1.jpg"].offset + 100])
    expected["cut_header.tar"] = {"h0": None, "unreadable_tail": "UnreadableTar"}

    members = _write_tar(folder / "garbage.tar", _samples("g0", "g1"))
    data = bytearray((folder / "garbage.tar").read_bytes())
    start = members["g1.jpg"].offset
    data[start : start + 512] = np.random.default_rng(7).bytes(512)
    (folder / "garbage.tar").write_bytes(bytes(data))
    expected["garbage.tar"] = {"g0": None, "unreadable_tail": "UnreadableTar"}

    for name, size in (("lying.tar", 10_000_000), ("lying_huge.tar", 1 << 60)):
        members = _write_tar(folder / name, _samples("l0", "l1", "l2"))
        data = bytearray((folder / name).read_bytes())
        _set_size(data, members["l1.jpg"].offset, size)
        (folder / name).write_bytes(bytes(data))
        expected[name] = {"l0": None, "l1": "TruncatedTar"}

    _write_tar(
        folder / "dupes.tar",
        [
            *_samples("a b", "a_b", "ok"),
            ("d.jpg", _jpeg(20)),
            ("d.txt", b"caption of d"),
            ("d.jpg", _jpeg(21)),
            ("e.jpg", _jpeg(22)),
            ("e.JPG", _jpeg(23)),
            ("e.txt", b"caption of e"),
            ("c.jpg", _jpeg(24)),
            ("c.txt", b"caf\xe9"),
        ],
    )
    expected["dupes.tar"] = {
        tar_key("x", "a b").removeprefix("x-"): None,
        "a_b": None,
        "ok": None,
        "d": "DuplicateMember",
        "e": "DuplicateMember",
        "c": "BadCaption",
    }

    (folder / "random.tar").write_bytes(np.random.default_rng(8).bytes(3000))
    expected["random.tar"] = {"unreadable": "UnreadableTar"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in _samples("z0"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (folder / "compressed.tar").write_bytes(gzip.compress(buf.getvalue()))
    expected["compressed.tar"] = {"unreadable": "UnreadableTar"}
    (folder / "fifo.tar").unlink(missing_ok=True)
    os.mkfifo(folder / "fifo.tar")
    expected["fifo.tar"] = {"unreadable": "UnreadableTar"}
    return expected


@pytest.fixture
def tars(tmp_path):
    return tmp_path / "tars", broken_tars(tmp_path / "tars")


@pytest.mark.timeout(20)
def test_broken_tars_keep_what_was_read_and_name_the_break(tars):
    folder, expected = tars
    for name, want in expected.items():
        path = folder / name
        rows = _rows(path)
        assert set(rows) == set(want), name
        for suffix, error in want.items():
            row = rows[suffix]
            if error is None:
                _assert_good(rows, suffix)
                continue
            assert row["source_error"].startswith(f"{error}: "), (name, row)
            assert str(path) in row["source_error"], row["source_error"]
            assert _error(decode_op(), row).error == error


def test_truncation_and_lies_name_the_member(tars):
    folder, _ = tars
    assert "member t1.jpg" in _rows(folder / "truncated.tar")["t1"]["source_error"]
    huge = _rows(folder / "lying_huge.tar")["l1"]["source_error"]
    assert "member l1.jpg" in huge and str(1 << 60) in huge
    assert "at byte" in _rows(folder / "garbage.tar")["unreadable_tail"]["source_error"]
    assert "gzip" in _rows(folder / "compressed.tar")["unreadable"]["source_error"]
    assert "FIFO" in _rows(folder / "fifo.tar")["unreadable"]["source_error"]
    dupes = _rows(folder / "dupes.tar")
    assert "d.jpg" in dupes["d"]["source_error"] and "e.JPG" in dupes["e"]["source_error"]


def test_colliding_member_names_get_distinct_keys(tars):
    folder, _ = tars
    rows = _rows(folder / "dupes.tar")
    spaced = tar_key("x", "a b").removeprefix("x-")
    assert spaced.startswith("a_b-") and spaced != "a_b"
    _assert_good(rows, spaced, "a_b", "ok")
    assert rows[spaced]["byte_offset"] != rows["a_b"]["byte_offset"]


def test_keys_stay_valid_and_a_remaining_collision_is_quarantined():
    long_a, long_b = "x" * 250 + "a", "x" * 250 + "b"
    shard = "s" * 80 + "_abcdef"
    keys = {tar_key(shard, long_a), tar_key(shard, long_b), tar_key(shard, "é/ü")}
    assert len(keys) == 3 and all(KEY_PATTERN.match(k) for k in keys)
    # A clean stem spelled like another stem's digest key: the later row is renamed and quarantined.
    clash = tar_key("s", "a b").removeprefix("s-")
    rows = [
        {"key": tar_key("s", "a b"), "uri": "t.tar"},
        {"key": tar_key("s", clash), "uri": "t.tar", "origin": "t.tar: sample " + clash},
    ]
    out = dedupe_keys(rows)
    assert out[0]["key"] != out[1]["key"] and KEY_PATTERN.match(out[1]["key"])
    assert out[1]["source_error"].startswith("DuplicateKey: t.tar: sample ")
    assert "source_error" not in out[0]


# --- item 11: parquet manifests that cannot be used name the file and the column --------


@pytest.mark.parametrize(
    ("columns", "column", "typename"),
    [
        ({"key": pa.array([1, 2]), "uri": ["a", "b"]}, "key", "int64"),
        ({"key": ["a", "b"], "uri": pa.array([b"a", b"b"], pa.binary())}, "uri", "binary"),
        ({"key": ["a", "b"], "uri": ["a", "b"], "caption": pa.array([1, 2])}, "caption", "int64"),
        (
            {"key": ["a", "b"], "uri": ["a", "b"], "byte_offset": ["0", "1"]},
            "byte_offset",
            "string",
        ),
    ],
)
def test_parquet_manifest_wrong_column_types(tmp_path, columns, column, typename):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(SourceError) as info:
        parquet_manifest(str(path))
    text = str(info.value)
    assert "\n" not in text and str(path) in text and repr(column) in text and typename in text


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_parquet_manifest_unreadable_file(tmp_path, damage):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"key": ["a"], "uri": ["b"]}), path)
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"not parquet at all" * 10, "truncated": data[: len(data) // 2], "empty": b""}[
            damage
        ]
    )
    with pytest.raises(SourceError) as info:
        parquet_manifest(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(SourceError, match="does not exist"):
        parquet_manifest(str(tmp_path / "missing.parquet"))


def test_parquet_manifest_values_that_do_not_fit(tmp_path):
    path = tmp_path / "m.parquet"
    table = pa.table(
        {"key": ["a"], "uri": ["u"], "byte_offset": pa.array([2**64 - 1], pa.uint64())}
    )
    pq.write_table(table, path)
    with pytest.raises(SourceError) as info:
        parquet_manifest(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_parquet_manifest_accepts_other_integer_and_string_encodings(tmp_path):
    path = tmp_path / "m.parquet"
    table = pa.table(
        {
            "key": pa.array(["a"]).dictionary_encode(),
            "uri": pa.array(["u"], pa.large_string()),
            "byte_offset": pa.array([3], pa.int32()),
            "byte_size": pa.array([4], pa.uint16()),
        }
    )
    pq.write_table(table, path)
    assert parquet_manifest(str(path)).to_pylist() == [
        {
            "key": "a",
            "uri": "u",
            "caption": None,
            "byte_offset": 3,
            "byte_size": 4,
            "source_error": None,
        }
    ]


# --- end to end on a real local Ray ------------------------------------------------------


def _quarantine_and_written(out: Path, subset: str) -> tuple[set[str], dict[str, dict]]:
    from datagen import shards

    written = set(shards.read_indexes(str(out), subset).column("key").to_pylist())
    q = shards.read_quarantine(str(out), subset).to_pylist()
    quarantined = {r["key"]: r for r in q}
    assert len(q) == len(quarantined), "a key was quarantined twice"
    return written, quarantined


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hostile_folder_end_to_end(ray_local, cheap_cfg, tmp_path):
    from datagen.sources.base import key_from_path
    from orchestration.datagen_job import run

    folder = tmp_path / "hostile"
    expected = write_hostile_folder(folder)
    cfg = cheap_cfg("max_error_rate=1.0", f"source.path={folder}", "source.kind=folder")
    result = run(cfg, log=lambda *_: None)
    out = Path(result.output)
    keys = {key_from_path(name): (name, err) for name, err in expected.items()}
    for subset in ("t2i", "i2i"):
        written, quarantined = _quarantine_and_written(out, subset)
        assert written == {k for k, (_, err) in keys.items() if err is None}
        assert set(quarantined) == {k for k, (_, err) in keys.items() if err is not None}
        for key, record in quarantined.items():
            name, err = keys[key]
            assert (record["stage"], record["error"]) == ("decode", err), record
            assert record["uri"] == str(folder / name)
        # The sidecar's reason names the sidecar itself.
        assert str(folder / "badcap.txt") in quarantined[key_from_path("badcap.jpg")]["message"]
        assert result.subsets[subset]["written"] + result.subsets[subset]["quarantined"] == len(
            keys
        )
        assert not result.subsets[subset]["problems"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_broken_tars_end_to_end(ray_local, cheap_cfg, tmp_path):
    from orchestration.datagen_job import run

    folder = tmp_path / "tars"
    expected = broken_tars(folder)
    cfg = cheap_cfg("max_error_rate=1.0", "source.kind=webdataset", f"source.urls={folder}/*.tar")
    result = run(cfg, log=lambda *_: None)
    out = Path(result.output)
    want = {
        f"{_prefix(folder / name)}-{suffix}": (name, err)
        for name, per_tar in expected.items()
        for suffix, err in per_tar.items()
    }
    assert result.inputs == len(want)
    for subset in ("t2i", "i2i"):
        written, quarantined = _quarantine_and_written(out, subset)
        assert written == {k for k, (_, err) in want.items() if err is None}
        assert set(quarantined) == {k for k, (_, err) in want.items() if err is not None}
        for key, record in quarantined.items():
            name, err = want[key]
            assert (record["stage"], record["error"]) == ("decode", err), record
            assert str(folder / name) in record["message"], record
        assert result.subsets[subset]["written"] + result.subsets[subset]["quarantined"] == len(
            want
        )
    meta = json.loads((out / "t2i" / "manifest.json").read_text())
    assert meta["written"] == len([1 for _, err in want.values() if err is None])
