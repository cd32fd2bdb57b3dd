"""Issue 9 items 3 and 11: every allowed key is writable and readable by every reader,
and ``verify``/``status``/``preview`` turn a damaged output into one-line reports."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from datagen import shards
from datagen.schema import KEY_PATTERN, SUBSETS, make_meta
from orchestration.cli import main as cli
from tests.helpers import REPO
from training.data import index as sampling

LONGEST_KEY = "K" * 199 + "z"  # 200 chars: the most KEY_PATTERN allows
LONGEST_FIELD = max((f.name for s in SUBSETS.values() for f in s.fields), key=len)


def _ustar_tar(samples: list[tuple[str, Mapping[str, bytes]]]) -> bytes:
    """The writer as it was before PAX: the byte-for-byte reference for short names."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for name in sorted(files):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(files[name]), 0, 0o444
                info.uname = info.gname = "onegen"
                tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def _t2i(key: str, caption: str = "a cat") -> tuple[str, dict[str, bytes]]:
    meta = make_meta(
        key, "t2i", f"/in/{key}.jpg", ["[[text2image]]"], caption=caption, width=8, height=8
    )
    return key, {
        "jpg": b"\xff\xd8\xff" + b"x" * 300,
        "txt": caption.encode(),
        "json": json.dumps(meta).encode(),
    }


def _multiview(key: str) -> tuple[str, dict[str, bytes]]:
    meta = make_meta(
        key,
        "multiview",
        f"/in/{key}",
        ["[[multiview]]"],
        scene="s",
        caption="",
        captions=["a", "b"],
        num_views=2,
        width=8,
        height=8,
        frames=[0, 1],
        camera_scale=1.0,
    )
    return key, {
        "img0.jpg": b"\xff\xd8a" * 100,
        "img1.jpg": b"\xff\xd8b" * 700,
        "cameras.npy": b"c" * 128,
        "intrinsics.npy": b"i" * 72,
        "json": json.dumps(meta).encode(),
    }


# --- item 3: long keys ---------------------------------------------------------------------------


def test_short_names_stay_byte_identical_to_ustar():
    # Up to 100 bytes a name fits ustar: no PAX header, so checksums of existing shards hold.
    edge = "e" * (100 - len(".json"))
    samples = [_t2i("k000"), _t2i("a-b_C9"), _t2i(edge)]
    assert max(len(f"{k}.{n}") for k, f in samples for n in f) == 100
    assert shards.tar_bytes(samples) == _ustar_tar(samples)


def test_longest_key_and_field_through_every_reader(tmp_path):
    assert KEY_PATTERN.match(LONGEST_KEY) and LONGEST_FIELD == "intrinsics.npy"
    with pytest.raises(ValueError):  # what the old writer did: every run crashed
        _ustar_tar([_multiview(LONGEST_KEY)])
    out, subset = str(tmp_path), "multiview"
    samples = [_multiview("a"), _multiview(LONGEST_KEY), _multiview("zz")]
    info = shards.commit_shard(out, subset, samples)
    assert info.name == shards.digest_name(subset, [k for k, _ in samples])
    shards.commit_quarantine(
        out,
        subset,
        [
            {
                "key": "Q" * 200,
                "uri": "/in/q",
                "subset": subset,
                "stage": "decode",
                "error": "E",
                "message": "m",
            }
        ],
    )
    shards.write_manifest(out, subset, {})
    report = shards.verify(out)
    assert report.ok, report.defects
    assert report.checked_samples == 3
    assert "Q" * 200 in shards.committed_keys(out, subset)
    assert LONGEST_KEY in shards.committed_keys(out, subset)

    tar_path = tmp_path / subset / f"{info.name}.tar"
    data = tar_path.read_bytes()
    rows = {r["key"]: r for r in shards.read_indexes(out, subset).to_pylist()}
    long_row = rows[LONGEST_KEY]
    # The range starts at the sample's PAX extended header ('x'), so it parses alone.
    assert data[long_row["offset"] + 156 : long_row["offset"] + 157] == b"x"
    fs = fsspec.filesystem("file")
    for key, files in samples:
        row = rows[key]
        chunk = shards.read_range(fs, str(tar_path), row["offset"], row["offset"] + row["length"])
        assert shards.sample_files(chunk, key) == dict(files)
        assert shards.read_tar_samples(chunk + b"\0" * 1024) == [(key, dict(files))]
        entry = shards.Entry(key, row["offset"], row["length"])
        assert shards.ShardReader(out).sample(subset, tar_path.name, entry) == dict(files)
    # One range request over all three samples, as training windows read them.
    names = [n for n, _ in shards.parse_members(data[: sum(r["length"] for r in rows.values())])]
    assert f"{LONGEST_KEY}.{LONGEST_FIELD}" in names and len(names) == 15
    assert shards.ShardReader(out).scan(subset, tar_path.name) == [
        (k, rows[k]["offset"], rows[k]["length"]) for k, _ in samples
    ]
    index = sampling.build_subset_index([out], subset)
    assert index.keys.to_pylist() == [k for k, _ in samples]

    got = {
        s["__key__"]: s
        for s in wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False)
    }
    assert sorted(got) == sorted(k for k, _ in samples)
    assert {k: v for k, v in got[LONGEST_KEY].items() if not k.startswith("__")} == dict(
        samples[1][1]
    )


@pytest.mark.parametrize(
    "header", [b"0 path=x\n", b"12 path=x\n", b"11 pathx\n\0\0", b"abc", b"9 path=\xff\n"]
)
def test_malformed_pax_header_is_a_format_error_not_a_hang(header):
    with pytest.raises(shards.TarFormatError):
        shards.tar._pax_info(header)


def test_pax_path_reads_tarfile_records():
    assert shards.tar._pax_info(b"")[0] is None
    assert shards.tar._pax_info(b"12 path=abc\n15 path=a.b.cd\n13 mtime=0.5\n")[0] == "a.b.cd"


def _image_file(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (96, 112, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _check_output(out: str, subset: str, key: str) -> None:
    """The key is written, verify passes (API and CLI), training and webdataset read it."""
    assert key in shards.read_indexes(out, subset).column("key").to_pylist()
    report = shards.verify(out)
    assert report.ok, report.defects
    assert cli(["datagen", "verify", out]) == 0
    index = sampling.build_subset_index([out], subset)
    i = index.keys.to_pylist().index(key)
    shard = int((index.shard_start <= i).sum()) - 1
    fs = fsspec.filesystem("file")
    chunk = shards.read_range(
        fs, index.urls[shard], int(index.offsets[i]), int(index.offsets[i] + index.lengths[i])
    )
    assert set(shards.sample_files(chunk, key)) == {f.name for f in SUBSETS[subset].fields}
    keys = {
        s["__key__"]
        for s in wds.WebDataset(
            shards.shard_urls(out, subset), shardshuffle=False, empty_check=False
        )
    }
    assert key in keys


@pytest.mark.slow
def test_long_keys_through_the_real_pipeline(ray_local, cheap_cfg, tmp_path):
    """A folder source with a deep path (the longest key it derives) and a parquet manifest
    with a 200-char key, each through a real local Ray run, verify and the readers."""
    from datagen.sources.base import key_from_path
    from orchestration.datagen_job import run

    folder = tmp_path / "images"
    relative = "/".join(["a_rather_long_folder_name_for_nesting"] * 5) + "/photo.jpg"
    _image_file(folder / relative, 0)
    (folder / relative).with_suffix(".txt").write_text("a noisy photo")
    folder_key = key_from_path(relative)
    assert len(folder_key) == 129  # 120 readable chars + "-" + 8 hex: the most it derives
    result = run(
        cheap_cfg(f"source.path={folder}", "source.kind=folder", f"output={tmp_path / 'a'}"),
        log=lambda *_: None,
    )
    assert result.subsets["i2i"]["written"] == 1 and result.subsets["t2i"]["written"] == 1
    _check_output(result.output, "i2i", folder_key)

    image = tmp_path / "plain.jpg"
    _image_file(image, 1)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table({"key": [LONGEST_KEY], "uri": [str(image)], "caption": ["a photo"]}), manifest
    )
    result = run(
        cheap_cfg(f"source.path={manifest}", "source.kind=parquet", f"output={tmp_path / 'b'}"),
        log=lambda *_: None,
    )
    assert result.subsets["i2i"]["written"] == 1 and result.subsets["t2i"]["written"] == 1
    _check_output(result.output, "i2i", LONGEST_KEY)
    _check_output(result.output, "t2i", LONGEST_KEY)


# --- item 11: damage becomes a DEFECT line, never a traceback ------------------------------------


@pytest.fixture
def built(tmp_path) -> Path:
    """A real, valid output: one t2i shard (one long key), one quarantine file, a manifest."""
    out = tmp_path / "out"
    shards.commit_shard(str(out), "t2i", [_t2i("a"), _t2i(LONGEST_KEY)])
    shards.commit_quarantine(
        str(out),
        "t2i",
        [
            {
                "key": "q",
                "uri": "/in/q",
                "subset": "t2i",
                "stage": "decode",
                "error": "E",
                "message": "m",
            }
        ],
    )
    shards.write_manifest(str(out), "t2i", {})
    assert shards.verify(str(out)).ok
    return out


def _one(folder: Path, pattern: str) -> Path:
    (path,) = folder.glob(pattern)
    return path


def _replace(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return path.name


def _truncate(path: Path) -> str:
    return _replace(path, path.read_bytes()[: path.stat().st_size // 2])


def _foreign_parquet(path: Path) -> str:
    pq.write_table(pa.table({"something": [1, 2]}), path)
    return path.name


def _null_keys(path: Path) -> str:
    table = pq.read_table(path)
    pq.write_table(table.set_column(0, "key", pa.nulls(table.num_rows, pa.string())), path)
    return path.name


def _manifest(out: Path, value: object) -> str:
    return _replace(out / "t2i" / "manifest.json", json.dumps(value).encode())


def _tar_gone(out: Path) -> str:
    tar = _one(out / "t2i", "*.tar")
    tar.unlink()
    return tar.name


def _tar_folder(out: Path) -> str:
    name = _tar_gone(out)
    (out / "t2i" / name).mkdir()
    return name


def _tar_dangling_link(out: Path) -> str:
    name = _tar_gone(out)
    (out / "t2i" / name).symlink_to(out / "nowhere.tar")
    return name


# name -> (damage(out) -> the file name a DEFECT line must name, whether `status` must fail)
DAMAGE: dict[str, tuple[Callable[[Path], str], bool]] = {
    "index-garbage": (lambda o: _replace(_one(o / "t2i", "*.parquet"), b"PAR1 not really"), True),
    "index-truncated": (lambda o: _truncate(_one(o / "t2i", "*.parquet")), True),
    "index-foreign": (lambda o: _foreign_parquet(_one(o / "t2i", "*.parquet")), True),
    "index-null-keys": (lambda o: _null_keys(_one(o / "t2i", "*.parquet")), True),
    "quarantine-garbage": (
        lambda o: _replace(_one(o / "t2i" / "quarantine", "*.parquet"), b"junk"),
        True,
    ),
    "quarantine-truncated": (
        lambda o: _truncate(_one(o / "t2i" / "quarantine", "*.parquet")),
        True,
    ),
    "manifest-not-json": (lambda o: _replace(o / "t2i" / "manifest.json", b"{oops"), False),
    "manifest-not-utf8": (lambda o: _replace(o / "t2i" / "manifest.json", b"\xff\xfe{"), False),
    "manifest-a-list": (lambda o: _manifest(o, [1, 2]), False),
    "manifest-shards-not-list": (lambda o: _manifest(o, {"shards": "all of them"}), False),
    "manifest-shard-types": (lambda o: _manifest(o, {"shards": [{"name": 5}]}), False),
    "manifest-written-type": (lambda o: _manifest(o, {"shards": [], "written": "many"}), False),
    "manifest-escapes": (
        lambda o: _manifest(
            o, {"shards": [{"name": "../../x.tar", "samples": 1, "bytes": 1, "sha256": "0"}]}
        ),
        False,
    ),
    "manifest-folder": (
        lambda o: (
            (o / "t2i" / "manifest.json").unlink(),
            (o / "t2i" / "manifest.json").mkdir(),
            "manifest.json",
        )[-1],
        False,
    ),
    "index-without-tar": (_tar_gone, False),
    "tar-is-a-folder": (_tar_folder, False),
    "tar-dangling-link": (_tar_dangling_link, False),
}


def _assert_one_line_error(rc: int, err: str, name: str) -> None:
    assert "Traceback" not in err
    if rc:
        assert rc == 1
        assert len(err.strip().splitlines()) == 1 and "error:" in err and name in err, err


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_is_reported_by_verify_status_and_preview(built, case, capsys, tmp_path):
    damage, status_fails = DAMAGE[case]
    name = damage(built)
    capsys.readouterr()
    assert cli(["datagen", "verify", str(built)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and not err.strip(), err
    defects = [line for line in out.splitlines() if line.startswith("DEFECT ")]
    assert any(name in line for line in defects), out
    assert out.splitlines()[-1].startswith("checked ")

    rc = cli(["datagen", "status", str(built)])
    _, err = capsys.readouterr()
    assert rc == int(status_fails), err
    _assert_one_line_error(rc, err, name)

    rc = cli(["datagen", "preview", str(built), "--out", str(tmp_path / "sheet.png")])
    _, err = capsys.readouterr()
    _assert_one_line_error(rc, err, name)


def test_unreadable_tar_is_a_defect(built, capsys, monkeypatch):
    tar = _one(built / "t2i", "*.tar")
    tar.chmod(0)
    if os.geteuid() == 0:  # root reads anything: refuse this one file the way the OS would
        import fsspec.implementations.local as local

        def guarded_open(path, *args, **kwargs):
            if os.fspath(path) == str(tar):
                raise PermissionError(13, "Permission denied", str(tar))
            return open(path, *args, **kwargs)

        monkeypatch.setattr(local, "open", guarded_open, raising=False)
    try:
        capsys.readouterr()
        assert cli(["datagen", "verify", str(built)]) == 1
        out, err = capsys.readouterr()
        assert not err and any(
            line.startswith("DEFECT ") and tar.name in line and "Permission denied" in line
            for line in out.splitlines()
        ), out
        rc = cli(["datagen", "preview", str(built), "--out", str(built.parent / "p.png")])
        _assert_one_line_error(rc, capsys.readouterr().err, tar.name)
        assert rc == 1
    finally:
        tar.chmod(0o644)


@pytest.mark.parametrize("kind", ["missing", "a-file"])
def test_output_that_is_not_a_folder(tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "a-file":
        out.write_text("x")
    assert cli(["datagen", "verify", str(out)]) == 1
    got = capsys.readouterr()
    assert "Traceback" not in got.err and f"DEFECT {out}" in got.out
    for argv in (
        ["status", str(out)],
        ["status", str(out), "--json"],
        ["preview", str(out), "--out", str(tmp_path / "p.png")],
    ):
        assert cli(["datagen", *argv]) == 1
        _assert_one_line_error(1, capsys.readouterr().err, str(out))


def test_read_indexes_and_quarantine_name_a_damaged_file(built):
    index = _one(built / "t2i", "*.parquet")
    _truncate(index)
    with pytest.raises(shards.ShardFileError, match=index.name) as caught:
        shards.committed_keys(str(built), "t2i")
    assert isinstance(caught.value, ValueError)
    quarantine = _one(built / "t2i" / "quarantine", "*.parquet")
    _replace(quarantine, b"junk")
    with pytest.raises(shards.ShardFileError, match=quarantine.name):
        shards.read_quarantine(str(built), "t2i")


def test_index_without_offsets_still_reads(built):
    """Indexes written before byte ranges lack offset/length: resume and status still work."""
    index = _one(built / "t2i", "*.parquet")
    pq.write_table(pq.read_table(index).drop_columns(["offset", "length"]), index)
    table = shards.read_indexes(str(built), "t2i")
    assert table.schema == shards.INDEX_SCHEMA and table.column("offset").null_count == 2
    assert shards.status(str(built))["t2i"]["written"] == 2
    assert shards.verify(str(built)).ok


def test_cli_subprocess_reports_every_damage_without_traceback(built):
    index = _replace(_one(built / "t2i", "*.parquet"), b"garbage")
    quarantine = _replace(_one(built / "t2i" / "quarantine", "*.parquet"), b"junk")
    (built / "t2i" / "manifest.json").write_text("[]")
    onegen = Path(sys.executable).parent / "onegen"
    cmd = [str(onegen)] if onegen.exists() else [sys.executable, "-m", "orchestration.cli"]
    proc = subprocess.run(
        [*cmd, "datagen", "verify", str(built)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    defects = [line for line in proc.stdout.splitlines() if line.startswith("DEFECT ")]
    for name in (index, quarantine, "manifest.json"):
        assert any(name in line for line in defects), proc.stdout


def test_rerun_cleanup_leaves_a_folder_named_like_a_tar(built):
    """``clean_incomplete`` (start of every run) removes files only; verify reports the folder."""
    name = _tar_folder(built)
    (built / "t2i" / _one(built / "t2i", "*.parquet").name).unlink()  # now an "orphan" folder
    assert shards.clean_incomplete(str(built)) == []
    assert (built / "t2i" / name).is_dir()
