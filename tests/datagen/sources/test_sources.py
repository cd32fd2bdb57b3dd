"""datagen.sources: folders, parquet manifests, existing WebDataset tars, the demo."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datagen.images import decode_image
from datagen.io import read_bytes
from datagen.schema import KEY_PATTERN
from datagen.sources import demo as demo_source
from datagen.sources import guess_spec, resolve
from datagen.sources.base import MANIFEST_SCHEMA, SourceError, key_from_path
from datagen.sources.demo import demo
from datagen.sources.folders import image_folder
from datagen.sources.parquet import parquet_manifest
from datagen.sources.webdataset import webdataset_shards


def _jpeg(colour=(200, 100, 50), size=(80, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(colour=(10, 20, 30), size=(72, 72)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# --- keys --------------------------------------------------------------------------------


def test_key_from_path_format():
    relative = "cats/tom.v2.jpg"
    digest = hashlib.sha1(relative.encode()).hexdigest()[:8]
    assert key_from_path(relative) == f"cats_tom_v2_jpg-{digest}"
    assert key_from_path(relative) == key_from_path(relative)
    assert key_from_path("a/b.jpg") != key_from_path("a_b.jpg")
    assert key_from_path("a/b.jpg").split("-")[0] == key_from_path("a_b.jpg").split("-")[0]


@pytest.mark.parametrize("relative", ["...", "élan/ça.jpg", "x" * 500 + ".png", "a b/c d.JPG"])
def test_key_from_path_always_valid(relative):
    key = key_from_path(relative)
    assert KEY_PATTERN.match(key), key
    assert "." not in key


# --- image_folder ------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "imgs"
    files = {
        "a/b.jpg": _jpeg(),
        "a_b.jpg": _jpeg((1, 2, 3)),
        "cats/tom.v2.jpg": _jpeg((9, 9, 9)),
        "deep/er/still/x.png": _png(),
        "UPPER.JPEG": _jpeg((50, 50, 50)),
        "broken.webp": b"not really a webp",  # kept: decode quarantines it
        "notes.txt": b"not an image",
        "meta.json": b"{}",
        "a/readme.md": b"# hi",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "cats" / "tom.v2.txt").write_text("  a grey cat named Tom \n", encoding="utf-8")
    images = sorted(
        rel for rel in files if rel.lower().rsplit(".", 1)[-1] in {"jpg", "jpeg", "png", "webp"}
    )
    return root, images


def test_image_folder_recursive_and_keys(image_tree):
    root, images = image_tree
    table = image_folder(str(root))
    assert table.schema == MANIFEST_SCHEMA
    rows = table.to_pylist()
    relatives = [str(Path(r["uri"]).relative_to(root)) for r in rows]
    assert sorted(relatives) == images  # every image, nested ones included, nothing else
    assert relatives == sorted(relatives)  # sorted order
    for row, rel in zip(rows, relatives, strict=True):
        assert row["key"] == key_from_path(rel)
        assert KEY_PATTERN.match(row["key"]) and "." not in row["key"]
        assert Path(row["uri"]).is_absolute() and Path(row["uri"]).exists()
        assert row["byte_offset"] is None and row["byte_size"] is None
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == len(keys)
    by_rel = dict(zip(relatives, keys, strict=True))
    assert by_rel["a/b.jpg"] != by_rel["a_b.jpg"]


def test_image_folder_sidecar_caption(image_tree):
    root, _ = image_tree
    captions = {Path(r["uri"]).name: r["caption"] for r in image_folder(str(root)).to_pylist()}
    assert captions["tom.v2.jpg"] == "a grey cat named Tom"
    assert captions["b.jpg"] is None and captions["x.png"] is None


def test_image_folder_is_stable(image_tree, monkeypatch):
    root, _ = image_tree
    first = image_folder(str(root))
    assert image_folder(str(root)).equals(first)
    assert image_folder(str(root) + "/").column("key").equals(first.column("key"))
    monkeypatch.chdir(root.parent)
    assert image_folder("imgs").column("key").equals(first.column("key"))


def test_image_folder_uris_read_back(image_tree):
    root, _ = image_tree
    for row in image_folder(str(root)).to_pylist():
        rel = Path(row["uri"]).relative_to(root)
        assert read_bytes(row["uri"]) == (root / rel).read_bytes()


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        image_folder(str(tmp_path / "nope"))
    (tmp_path / "file.jpg").write_bytes(_jpeg())
    with pytest.raises(SourceError, match="not a folder"):
        image_folder(str(tmp_path / "file.jpg"))
    (tmp_path / "empty").mkdir()
    assert image_folder(str(tmp_path / "empty")).num_rows == 0


# --- parquet_manifest --------------------------------------------------------------------


def _write_parquet(where: Path, **columns) -> str:
    pq.write_table(pa.table(columns), where)
    return str(where)


def test_parquet_manifest_reads_rows(tmp_path):
    path = _write_parquet(
        tmp_path / "m.parquet",
        key=["k1", "k2"],
        uri=["s3://bucket/1.jpg", "/data/2.png"],
        caption=["one", None],
    )
    table = parquet_manifest(path)
    assert table.schema == MANIFEST_SCHEMA
    assert table.to_pylist() == [
        {
            "key": "k1",
            "uri": "s3://bucket/1.jpg",
            "caption": "one",
            "byte_offset": None,
            "byte_size": None,
            "source_error": None,
        },
        {
            "key": "k2",
            "uri": "/data/2.png",
            "caption": None,
            "byte_offset": None,
            "byte_size": None,
            "source_error": None,
        },
    ]


def test_parquet_manifest_byte_ranges_and_no_caption(tmp_path):
    path = _write_parquet(
        tmp_path / "m.parquet", key=["a"], uri=["x.tar"], byte_offset=[512], byte_size=[1000]
    )
    row = parquet_manifest(path).to_pylist()[0]
    assert row == {
        "key": "a",
        "uri": "x.tar",
        "caption": None,
        "byte_offset": 512,
        "byte_size": 1000,
        "source_error": None,
    }


@pytest.mark.parametrize(
    ("columns", "missing"),
    [
        ({"key": ["a"]}, "['uri']"),
        ({"uri": ["a.jpg"]}, "['key']"),
        ({"path": ["a.jpg"]}, "['key', 'uri']"),
    ],
)
def test_parquet_manifest_missing_columns(tmp_path, columns, missing):
    path = _write_parquet(tmp_path / "m.parquet", **columns)
    with pytest.raises(SourceError, match=f"lacks columns {missing}".replace("[", r"\[")):
        parquet_manifest(path)


def test_parquet_manifest_duplicate_keys(tmp_path):
    path = _write_parquet(tmp_path / "m.parquet", key=["a", "b", "a"], uri=["1", "2", "3"])
    with pytest.raises(SourceError, match="1 duplicate keys.*'a'"):
        parquet_manifest(path)


@pytest.mark.parametrize("bad", ["cat.jpg", "a b", "", None])
def test_parquet_manifest_invalid_keys(tmp_path, bad):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"key": pa.array(["ok", bad], pa.string()), "uri": ["1", "2"]}), path)
    with pytest.raises(SourceError, match="1 invalid keys"):
        parquet_manifest(str(path))


# --- webdataset_shards -------------------------------------------------------------------


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shard(tmp_path):
    images = {
        "000001": _jpeg((255, 0, 0)),
        "000002": _png((0, 255, 0)),
        "sub/000003": _jpeg((0, 0, 255), size=(100, 70)),
        "000005": _jpeg((7, 7, 7)),
    }
    members = [
        ("000001.jpg", images["000001"]),
        ("000001.txt", b"  red square \n"),
        ("000001.json", json.dumps({"caption": "ignored, txt wins"}).encode()),
        ("000002.json", json.dumps({"caption": "a green square"}).encode()),
        ("000002.png", images["000002"]),
        ("sub/000003.jpg", images["sub/000003"]),
        ("sub/000003.seg.png", _png((1, 1, 1))),  # not the image: its extension is seg.png
        ("000004.txt", b"an orphan caption"),
        ("000005.jpg", images["000005"]),
        ("000005.json", b"{broken json"),
    ]
    path = tmp_path / "train-000.tar"
    _write_tar(path, members)
    return path, images


def _prefix(path) -> str:
    """Shard name plus a digest of its URL, as webdataset_shards prefixes keys."""
    name = path.name.removesuffix(".tar").replace("-", "_")
    return f"{name}_{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"


# A stem that cleaning changes carries a digest of the original: "sub/x" and "sub_x" differ.
SUB3 = "sub_000003-" + hashlib.sha1(b"sub/000003").hexdigest()[:8]


def test_webdataset_shards_rows(shard):
    path, images = shard
    p = _prefix(path)
    rows = {r["key"]: r for r in webdataset_shards(str(path)).to_pylist()}
    assert set(rows) == {
        f"{p}-000001",
        f"{p}-000002",
        f"{p}-{SUB3}",
        f"{p}-000004",
        f"{p}-000005",
    }
    assert rows[f"{p}-000001"]["caption"] == "red square"
    assert rows[f"{p}-000002"]["caption"] == "a green square"
    assert rows[f"{p}-{SUB3}"]["caption"] is None
    assert rows[f"{p}-000005"]["caption"] is None
    assert rows[f"{p}-000004"]["caption"] == "an orphan caption"
    for row in rows.values():
        assert row["uri"] == str(path)
        assert KEY_PATTERN.match(row["key"])


def test_webdataset_byte_ranges_read_back_the_image(shard):
    path, images = shard
    rows = {r["key"]: r for r in webdataset_shards(str(path)).to_pylist()}
    for stem, data in images.items():
        row = rows[f"{_prefix(path)}-" + (SUB3 if "/" in stem else stem)]
        assert row["byte_size"] == len(data)
        got = read_bytes(row["uri"], row["byte_offset"], row["byte_size"])
        assert got == data, stem
        assert decode_image(got).shape[2] == 3
    # a group without an image keeps its row with an empty range: decode rejects it
    orphan = rows[f"{_prefix(path)}-000004"]
    assert (orphan["byte_offset"], orphan["byte_size"]) == (0, 0)
    assert read_bytes(orphan["uri"], orphan["byte_offset"], orphan["byte_size"]) == b""


def test_webdataset_shards_brace_and_glob(tmp_path):
    for i in range(3):
        _write_tar(
            tmp_path / f"part-{i:03d}.tar",
            [("000001.jpg", _jpeg((i, i, i))), ("000001.txt", f"n{i}".encode())],
        )
    braced = webdataset_shards(str(tmp_path / "part-{000..002}.tar"))
    globbed = webdataset_shards(str(tmp_path / "part-*.tar"))
    listed = webdataset_shards([str(tmp_path / f"part-{i:03d}.tar") for i in range(3)])
    keys = [f"{_prefix(tmp_path / f'part-{i:03d}.tar')}-000001" for i in range(3)]
    for table in (braced, globbed, listed):
        assert table.column("key").to_pylist() == keys  # same stem, no collision across shards
        assert table.column("caption").to_pylist() == ["n0", "n1", "n2"]
        for row, i in zip(table.to_pylist(), range(3), strict=True):
            data = read_bytes(row["uri"], row["byte_offset"], row["byte_size"])
            assert data == _jpeg((i, i, i))


# --- demo --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, demo(str(root), n=20)


def test_demo_rows(demo_dir):
    root, table = demo_dir
    assert table.schema == MANIFEST_SCHEMA
    assert table.num_rows == 20
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"demo_{i:06d}" for i in range(20)]
    assert rows[0]["key"] == "demo_000000" and rows[19]["key"] == "demo_000019"
    for row in rows:
        path = Path(row["uri"])
        assert path.exists() and path.parent == root and path.name == row["key"] + ".jpg"
        assert isinstance(row["caption"], str) and row["caption"].strip()
    assert (root / "manifest.parquet").exists()
    # real photos, bounded by max_side, and they decode
    for row in rows[::5]:
        image = decode_image(Path(row["uri"]).read_bytes())
        assert max(image.shape[:2]) <= 512 and min(image.shape[:2]) >= 64
        assert image.std() > 5


def test_demo_second_call_reuses_the_cache(demo_dir, monkeypatch):
    root, table = demo_dir
    mtimes = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}

    def no_images():
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(demo_source, "base_demo_images", no_images)
    again = demo(str(root), n=20)
    assert again.equals(table)
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == mtimes


def _fake_bases():
    left = np.zeros((96, 128, 3), np.uint8)
    left[:, :64] = 255  # white left half: the flip moves it right
    return [
        ("one", Image.fromarray(left), "first picture"),
        ("two", Image.new("RGB", (128, 96), (30, 90, 150)), "second picture"),
    ]


def test_demo_augmentations_and_regeneration(tmp_path, monkeypatch):
    calls = []

    def fake():
        calls.append(1)
        return _fake_bases()

    monkeypatch.setattr(demo_source, "base_demo_images", fake)
    table = demo(str(tmp_path), n=8, max_side=64)
    assert calls == [1]
    assert table.column("caption").to_pylist() == [
        "first picture",
        "second picture",
        "first picture, mirrored",
        "second picture, mirrored",
        "first picture, cropped close",
        "second picture, cropped close",
        "first picture, in warm light",
        "second picture, in warm light",
    ]
    uris = table.column("uri").to_pylist()
    original = decode_image(Path(uris[0]).read_bytes(), _small())
    mirrored = decode_image(Path(uris[2]).read_bytes(), _small())
    assert original.shape == (48, 64, 3)  # thumbnail to max_side, aspect kept
    assert original[:, :24].mean() > 200 and original[:, 40:].mean() < 50
    assert mirrored[:, :24].mean() < 50 and mirrored[:, 40:].mean() > 200

    demo(str(tmp_path), n=8, max_side=64)
    assert calls == [1]  # cached
    Path(uris[3]).unlink()
    assert demo(str(tmp_path), n=8, max_side=64).num_rows == 8
    assert calls == [1, 1]  # a missing file regenerates
    assert Path(uris[3]).exists()
    assert demo(str(tmp_path), n=5, max_side=64).num_rows == 5
    assert calls == [1, 1, 1]  # a different n regenerates


def _small():
    from datagen.io import DecodeParams

    return DecodeParams(min_side=16)


# --- spec guessing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("demo", {"kind": "demo"}),
        ("/data/manifest.parquet", {"kind": "parquet", "path": "/data/manifest.parquet"}),
        (
            "s3://b/train-{000..009}.tar",
            {"kind": "webdataset", "urls": "s3://b/train-{000..009}.tar"},
        ),
        ("/data/shard.tar", {"kind": "webdataset", "urls": "/data/shard.tar"}),
        ("/data/photos", {"kind": "folder", "path": "/data/photos"}),
        ("photos/", {"kind": "folder", "path": "photos/"}),
    ],
)
def test_guess_spec(text, spec):
    assert guess_spec(text) == spec


def test_resolve(tmp_path, image_tree):
    root, images = image_tree
    assert resolve(str(root)).num_rows == len(images)
    assert resolve({"kind": "folder", "path": str(root)}).equals(image_folder(str(root)))
    with pytest.raises(SourceError, match="unknown source kind"):
        resolve({"kind": "ftp"})


def test_every_registered_source_follows_the_protocol():
    """One registry: each kind names a Source class of that ``kind`` whose Params start with
    ``kind``; group sources say which subset their rows are samples of."""
    import dataclasses
    import types

    from datagen.sources import SOURCES, source
    from datagen.sources.base import Source

    for kind in SOURCES:
        cls = source(kind)
        assert issubclass(cls, Source) and cls.kind == kind
        assert dataclasses.fields(cls.Params)[0].name == "kind"
    assert {k: source(k).subset for k in SOURCES if source(k).subset} == {
        "scenes": "multiview",
        "procedural_scenes": "multiview",
        "identities": "faceid",
        "demo_identities": "faceid",
    }
    # the package binds no name over a submodule: ``datagen.sources.demo`` is the module
    assert isinstance(demo_source, types.ModuleType) and demo_source.demo is demo


def test_webdataset_shards_with_the_same_name_in_two_folders_do_not_collide(shard, tmp_path):
    path, _ = shard
    other = tmp_path / "val"
    other.mkdir()
    (other / path.name).write_bytes(path.read_bytes())
    table = webdataset_shards([str(path), str(other / path.name)])
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 10
