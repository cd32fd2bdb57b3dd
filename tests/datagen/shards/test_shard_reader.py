"""The one shard reader (``datagen.shards.ShardReader``) and the one tar walker under it
(``iter_members``): what every reader of the format relies on, checked against ``tarfile``
on tars it writes in every format, and on damaged tars and indexes."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from datagen import shards
from datagen.schema import make_meta

LONG_KEY = "L" * 190 + "ongest"


def _sample(key: str, size: int = 300) -> tuple[str, dict[str, bytes]]:
    meta = make_meta(
        key, "t2i", f"/in/{key}.jpg", ["[[text2image]]"], caption="a cat", width=8, height=8
    )
    return key, {
        "jpg": b"\xff\xd8\xff" + key.encode()[:8] * size,
        "txt": b"a cat",
        "json": json.dumps(meta).encode(),
    }


@pytest.fixture
def out(tmp_path) -> Path:
    """Two committed t2i shards (one with a 196-char key: PAX headers) and a manifest."""
    root = tmp_path / "out"
    shards.commit_shard(str(root), "t2i", [_sample("a"), _sample(LONG_KEY), _sample("c", 900)])
    shards.commit_shard(str(root), "t2i", [_sample("d"), _sample("e")])
    shards.write_manifest(str(root), "t2i", {})
    assert shards.verify(str(root)).ok
    return root


def _tar(out: Path, key: str = "a") -> str:
    """The name of the tar holding ``key``."""
    rows = shards.read_indexes(str(out), "t2i").to_pylist()
    return next(f"{r['shard']}.tar" for r in rows if r["key"] == key)


# --- the reader -------------------------------------------------------------------------------


def test_reader_lists_reads_and_addresses_every_sample(out):
    reader = shards.ShardReader(str(out))
    assert reader.subsets() == ["t2i"] == reader.subsets(with_manifest=True)
    manifest = reader.manifest("t2i")
    assert manifest is not None and manifest["written"] == 5
    names = reader.shards("t2i")
    assert names == sorted(s["name"] for s in manifest["shards"]) and len(names) == 2
    assert reader.urls("t2i") == [str(out / "t2i" / n) for n in names]
    assert reader.urls("t2i") == shards.shard_urls(str(out), "t2i")
    seen = {}
    for name in names:
        entries = reader.entries("t2i", name)
        assert entries == reader.scan("t2i", name)  # the index and a header scan agree
        streamed = list(reader.samples("t2i", name))
        assert [k for k, _ in streamed] == [e.key for e in entries]
        tar = (out / "t2i" / name).read_bytes()
        assert shards.read_tar_samples(tar) == streamed
        for entry, (key, files) in zip(entries, streamed, strict=True):
            assert reader.sample("t2i", name, entry) == files
            chunk = reader.read_range("t2i", name, entry.offset, entry.offset + entry.length)
            assert shards.sample_files(chunk, key) == files
            seen[key] = files
    assert seen == {k: f for k, f in [_sample(k) for k in ("a", LONG_KEY, "d", "e")]} | {
        "c": _sample("c", 900)[1]
    }


def test_root_may_be_the_subset_folder_itself(out):
    whole, inner = shards.ShardReader(str(out)), shards.ShardReader(str(out / "t2i"))
    assert inner.directory("t2i") == str(out / "t2i") == whole.directory("t2i")
    name = _tar(out)
    assert inner.entries("t2i", name) == whole.entries("t2i", name)
    assert inner.url("t2i", name) == whole.url("t2i", name)


def test_a_missing_manifest_lists_the_tars_present(out):
    (out / "t2i" / shards.MANIFEST).unlink()
    (out / "t2i" / "folder.tar").mkdir()  # not a file: not a shard
    reader = shards.ShardReader(str(out))
    assert reader.manifest("t2i") is None
    assert reader.shards("t2i") == sorted(p.name for p in (out / "t2i").glob("t2i-*.tar"))
    with pytest.raises(FileNotFoundError, match="run or finish the DAG"):
        reader.urls("t2i")


def test_fsspec_urls_read_like_local_folders(out):
    mem = fsspec.filesystem("memory")
    for path in (out / "t2i").iterdir():
        if path.is_file():
            mem.pipe(f"/reader-test/out/t2i/{path.name}", path.read_bytes())
    local = shards.ShardReader(str(out))
    remote = shards.ShardReader("memory://reader-test/out")
    name = _tar(out, LONG_KEY)
    assert remote.url("t2i", name) == f"memory://reader-test/out/t2i/{name}"
    entries = remote.entries("t2i", name)
    assert entries == local.entries("t2i", name) == remote.scan("t2i", name)
    assert list(remote.samples("t2i", name)) == list(local.samples("t2i", name))
    assert [remote.sample("t2i", name, e) for e in entries] == [
        local.sample("t2i", name, e) for e in entries
    ]


# --- the index and its fallbacks ---------------------------------------------------------


def _index(out: Path, name: str) -> Path:
    return out / "t2i" / name.replace(".tar", ".parquet")


def test_entries_fall_back_to_a_scan(out, recwarn):
    reader, name = shards.ShardReader(str(out)), _tar(out)
    want = reader.entries("t2i", name)
    index = _index(out, name)
    pq.write_table(pq.read_table(index).drop_columns(["offset", "length"]), index)
    assert reader.entries("t2i", name) == want  # an old index: scanned, silently
    index.unlink()
    assert reader.entries("t2i", name) == want  # no index: scanned, silently
    assert not recwarn.list


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: b"PAR1 not a parquet file",
        lambda t: t.set_column(
            t.column_names.index("offset"), "offset", pq_array([10**12] * t.num_rows)
        ),
        lambda t: t.set_column(
            t.column_names.index("length"), "length", pq_array([-1] * t.num_rows)
        ),
        lambda t: t.set_column(
            t.column_names.index("offset"), "offset", pq_array([0] * t.num_rows)
        ),
    ],
    ids=["garbage", "past-the-end", "negative-length", "overlapping"],
)
def test_a_damaged_index_is_a_warning_and_a_scan(out, damage):
    reader, name = shards.ShardReader(str(out)), _tar(out)
    want = reader.scan("t2i", name)
    index = _index(out, name)
    damaged = damage(pq.read_table(index))
    if isinstance(damaged, bytes):
        index.write_bytes(damaged)
    else:
        pq.write_table(damaged, index)
    with pytest.warns(UserWarning, match="scanning the tar instead"):
        assert reader.entries("t2i", name) == want


def pq_array(values):
    import pyarrow as pa

    return pa.array(values, pa.int64())


def test_no_usable_index_and_a_broken_tar_is_an_error_naming_it(out):
    reader, name = shards.ShardReader(str(out)), _tar(out)
    _index(out, name).unlink()
    tar = out / "t2i" / name
    with tarfile.open(tar) as opened:
        second = opened.getmembers()[1].offset
    data = bytearray(tar.read_bytes())
    data[second : second + 12] = b"XXXXXXXXXXXX"  # the second member's header
    tar.write_bytes(bytes(data))
    with pytest.raises(shards.ShardFileError, match=f"{name}.*invalid header at byte {second}"):
        reader.entries("t2i", name)
    with pytest.raises(shards.ShardFileError, match=f"{name}: unreadable tar"):
        list(reader.samples("t2i", name))


@pytest.mark.timeout(20)
def test_tars_that_are_not_files_are_refused_without_blocking(out):
    reader, name = shards.ShardReader(str(out)), _tar(out)
    tar = out / "t2i" / name
    tar.unlink()
    os.mkfifo(tar)  # opening a FIFO for reading blocks until a writer comes: never opened
    for call in (
        lambda: list(reader.samples("t2i", name)),
        lambda: reader.scan("t2i", name),
        lambda: reader.read_range("t2i", name, 0, 512),
    ):
        with pytest.raises(shards.ShardFileError, match="not a regular file"):
            call()


def test_range_reads_are_bounded_and_may_come_back_short(out):
    name = _tar(out, "c")
    reader = shards.ShardReader(str(out), max_read_bytes=2048)
    entry = next(e for e in reader.entries("t2i", name) if e.key == "c")
    assert entry.length > 2048
    with pytest.raises(shards.ShardFileError, match="max_bytes=2048"):
        reader.sample("t2i", name, entry)
    with pytest.raises(shards.ShardFileError, match="bad byte range"):
        reader.read_range("t2i", name, 10, 5)
    tar = out / "t2i" / name
    size = tar.stat().st_size
    assert (
        len(shards.ShardReader(str(out)).read_range("t2i", name, size - 100, size + 10**6)) == 100
    )
    tar.write_bytes(tar.read_bytes()[: entry.offset + 700])
    with pytest.raises(shards.TarFormatError, match="cut short"):
        shards.ShardReader(str(out)).sample("t2i", name, entry)


def test_a_hung_read_times_out(out, monkeypatch):
    reader, name = shards.ShardReader(str(out), timeout_s=0.2), _tar(out)
    release = threading.Event()

    class Stuck(io.BytesIO):
        def read(self, *args):
            release.wait(5)
            return b""

    monkeypatch.setattr(reader.fs, "open", lambda *a, **k: Stuck())
    try:
        with pytest.raises(shards.ShardFileError, match="no data after"):
            reader.read_range("t2i", name, 0, 512)
    finally:
        release.set()


# --- the walker against tarfile ----------------------------------------------------------

MEMBERS = [
    ("dir", None),
    ("dir/k1.jpg", b"x" * 700),
    ("dir/k1.json", b"{}"),
    ("K" * 150 + ".intrinsics.npy", b"i" * 72),  # > 100 bytes: PAX, GNU long name or prefix
    ("link", "dir/k1.jpg"),
    ("plain.txt", b""),
    ("nodot", b"n" * 10),
    ("caf\u00e9/k2.png", b"p" * 1024),
]


def _write(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, payload in MEMBERS:
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                name = f"{'P' * 90}/{name[-60:]}"  # fits ustar's 155-byte prefix
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
            elif isinstance(payload, str):
                info.type, info.linkname = tarfile.SYMTYPE, payload
            else:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if isinstance(payload, bytes) else None)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=str
)
def test_walker_agrees_with_tarfile(fmt, tmp_path):
    data = _write(fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        want = [(m.name, m.offset, m.offset_data, m.size, m.isfile()) for m in tar]
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    got = [(m.name, m.offset, m.offset_data, m.size, m.isfile) for m in shards.iter_members(data)]
    assert [g for g in got if g[4]] == [w for w in want if w[4]]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert dict(shards.parse_members(data)) == files
    path = tmp_path / "x.tar"
    path.write_bytes(data)
    with open(path, "rb", buffering=0) as fh:  # a file: payloads skipped by seeking
        assert [(m.name, m.offset) for m in shards.iter_members(fh, len(data))] == [
            (g[0], g[1]) for g in got
        ]
    samples = dict(shards.read_tar_samples(data))
    assert "nodot" not in samples and set(samples["dir/k1"]) == {"jpg", "json"}


def test_walker_stops_at_a_lying_size_without_reading_it(tmp_path):
    data = bytearray(_write(tarfile.GNU_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar if m.name == "dir/k1.jpg")
    field = b"\x80" + (1 << 60).to_bytes(11, "big")  # base-256: 1 EiB
    data[member.offset + 124 : member.offset + 136] = field
    data[member.offset + 148 : member.offset + 156] = b" " * 8
    data[member.offset + 148 : member.offset + 156] = b"%06o\0 " % sum(
        data[member.offset : member.offset + 512]
    )
    got = list(shards.iter_members(bytes(data)))
    assert got[-1].name == "dir/k1.jpg" and got[-1].truncated and got[-1].size == 1 << 60
    with pytest.raises(shards.TarFormatError, match="cut short"):
        shards.parse_members(bytes(data))
    with pytest.raises(shards.TarFormatError, match="cut short"):
        shards.member_data(bytes(data), got[-1], max_bytes=1 << 62)
    with pytest.raises(shards.TarFormatError, match="bytes >"):
        shards.member_data(bytes(data), got[-1])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: b"", "empty file"),
        (lambda d: d[:700], "truncated header at byte 512"),
        (lambda d: d[:512] + b"\x01" * 512 + d[1024:], "invalid header at byte 512"),
        (lambda d: d[:512] + bytes(512) + b"junk after the end", None),  # end of archive
    ],
    ids=["empty", "cut-header", "garbage-header", "zeros-end-it"],
)
def test_walker_names_the_damage(damage, message):
    data = damage(_write(tarfile.USTAR_FORMAT))
    if message is None:
        assert [m.name for m in shards.iter_members(data)] == ["dir"]
        return
    with pytest.raises(shards.TarFormatError, match=message) as caught:
        list(shards.iter_members(data))
    assert caught.value.offset == (0 if not data else 512)


def test_oversized_extended_header_is_refused():
    info = tarfile.TarInfo("x" * 200)
    header = bytearray(info.tobuf(tarfile.PAX_FORMAT))
    header[124:136] = b"%011o\0" % (shards.MAX_EXTENDED_HEADER + 1)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    with pytest.raises(shards.TarFormatError, match="extended header at byte 0 claims"):
        list(shards.iter_members(bytes(header[:512]) + bytes(2048)))


def test_sparse_members_are_flagged_and_refused_in_shards():
    data = bytearray(_write(tarfile.GNU_FORMAT))
    data[156:157] = b"S"  # the first member ("dir") becomes an old-GNU sparse file
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])
    first = next(shards.iter_members(bytes(data)))
    assert first.sparse and first.isfile
    with pytest.raises(shards.TarFormatError, match="sparse"):
        shards.read_tar_samples(bytes(data))


def test_a_tar_cut_in_a_members_padding_is_truncated():
    """The data is whole but the archive was cut: strict readers refuse it, the walker flags
    the member and stops (the WebDataset source reports the tail, not the sample)."""
    data = _write(tarfile.USTAR_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = next(m for m in tar if m.name == "dir/k1.jpg")
    cut = data[: member.offset_data + member.size + 10]  # 700 bytes of data, padding cut
    last = list(shards.iter_members(cut))[-1]
    assert last.name == "dir/k1.jpg" and last.truncated
    with pytest.raises(shards.TarFormatError, match="cut short"):
        shards.read_tar_samples(cut)
    with pytest.raises(shards.TarFormatError, match="runs past the end"):
        shards.scan_entries(cut)
