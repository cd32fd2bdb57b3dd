"""Shard commit protocol, bookkeeping and verify, without Ray."""

from __future__ import annotations

import json

import webdataset as wds

from datagen import shards
from datagen.schema import make_meta


def _sample(key: str, caption: str = "a cat") -> tuple[str, dict[str, bytes]]:
    meta = make_meta(
        key, "t2i", f"/in/{key}.jpg", ["[[text2image]]"], caption=caption, width=8, height=8
    )
    return key, {
        "jpg": b"\xff\xd8\xff" + key.encode() * 50,
        "txt": caption.encode(),
        "json": json.dumps(meta).encode(),
    }


def test_commit_is_reproducible_and_readable_by_webdataset(tmp_path):
    out = str(tmp_path)
    samples = [_sample(f"k{i:03d}") for i in range(5)]
    info = shards.commit_shard(out, "t2i", samples)
    tar = tmp_path / "t2i" / f"{info.name}.tar"
    first = tar.read_bytes()
    again = shards.commit_shard(out, "t2i", list(reversed(samples)))  # same keys -> same name
    assert again.name == info.name
    assert sorted(p.name for p in (tmp_path / "t2i").iterdir()) == [
        f"{info.name}.parquet",
        f"{info.name}.tar",
    ]
    assert shards.tar_bytes(samples) == first
    got = {s["__key__"]: s for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)}
    assert sorted(got) == [k for k, _ in samples]
    assert got["k002"]["txt"] == b"a cat"
    index = shards.read_indexes(out, "t2i").to_pylist()
    assert {r["tar_sha256"] for r in index} == {again.sha256}


def test_split_respects_count_and_bytes():
    samples = [_sample(f"k{i:03d}") for i in range(10)]
    assert [len(g) for g in shards.split_shards(samples, 4, 10**9)] == [4, 4, 2]
    one = sum(len(v) for v in samples[0][1].values()) + 512 * 4
    assert [len(g) for g in shards.split_shards(samples, 100, 2 * one)] == [2] * 5
    assert [len(g) for g in shards.split_shards(samples[:2], 100, 1)] == [1, 1]  # oversized: alone


def test_interrupted_commit_leftovers_are_uncommitted_and_cleaned(tmp_path):
    out = str(tmp_path)
    good = shards.commit_shard(out, "t2i", [_sample("a"), _sample("b")])
    orphan = shards.commit_shard(out, "t2i", [_sample("c")])
    (tmp_path / "t2i" / f"{orphan.name}.parquet").unlink()  # killed between tar and index
    (tmp_path / "t2i" / f".x.tar{shards.TMP_MARK}123").write_bytes(b"partial")
    assert shards.committed_keys(out, "t2i") == {"a", "b"}
    removed = shards.clean_incomplete(out)
    assert len(removed) == 2
    assert sorted(p.name for p in (tmp_path / "t2i").iterdir()) == [
        f"{good.name}.parquet",
        f"{good.name}.tar",
    ]


def test_quarantine_counts_as_committed_and_verify_flags_overlap(tmp_path):
    out = str(tmp_path)
    shards.commit_shard(out, "t2i", [_sample("a")])
    shards.commit_quarantine(
        out,
        "t2i",
        [
            {
                "key": "b",
                "uri": "/in/b",
                "subset": "t2i",
                "stage": "decode",
                "error": "CorruptImage",
                "message": "truncated",
            }
        ],
    )
    assert shards.committed_keys(out, "t2i") == {"a", "b"}
    shards.write_manifest(out, "t2i", {})
    assert shards.verify(out).ok
    assert shards.status(out)["t2i"] == {
        "written": 1,
        "quarantined": 1,
        "filtered": 0,
        "shards": 1,
        "bytes": shards.status(out)["t2i"]["bytes"],
        "errors": {"CorruptImage": 1},
    }
    shards.commit_quarantine(
        out,
        "t2i",
        [{"key": "a", "uri": "/in/a", "subset": "t2i", "stage": "x", "error": "E", "message": ""}],
    )
    assert any("both written and quarantined" in d for d in shards.verify(out).defects)


def test_verify_flags_duplicates_missing_manifest_and_schema_breaks(tmp_path):
    out = str(tmp_path)
    shards.commit_shard(out, "t2i", [_sample("a"), _sample("b")])
    assert any("manifest.json is missing" in d for d in shards.verify(out).defects)
    shards.commit_shard(out, "t2i", [_sample("b"), _sample("c")])  # "b" twice
    shards.write_manifest(out, "t2i", {})
    assert any("more than once" in d for d in shards.verify(out).defects)

    bad = tmp_path / "bad"
    key, files = _sample("z")
    files["json"] = b"{not json"
    shards.commit_shard(str(bad), "t2i", [(key, files)])
    shards.write_manifest(str(bad), "t2i", {})
    assert any("does not parse" in d for d in shards.verify(str(bad)).defects)


def test_index_byte_ranges_address_each_sample(tmp_path):
    out = str(tmp_path)
    samples = [_sample(f"k{i:03d}", caption="x" * (i * 300)) for i in range(4)]
    info = shards.commit_shard(out, "t2i", samples)
    data = (tmp_path / "t2i" / f"{info.name}.tar").read_bytes()
    rows = shards.read_indexes(out, "t2i").to_pylist()
    for (key, files), row in zip(samples, rows, strict=True):
        chunk = data[row["offset"] : row["offset"] + row["length"]] + b"\0" * 1024
        assert shards.read_tar_samples(chunk) == [(key, dict(files))]
    # One range covering samples 1..2 reads exactly those two.
    start = rows[1]["offset"]
    end = rows[2]["offset"] + rows[2]["length"]
    assert [k for k, _ in shards.read_tar_samples(data[start:end] + b"\0" * 1024)] == [
        "k001",
        "k002",
    ]
