"""Identity sources: manifests in three formats, bad manifests and bad rows, the sampling
of photos per identity, keys, and the demo identities' cache."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datagen.params import ParamError
from datagen.schema import KEY_PATTERN
from datagen.sources import resolve
from datagen.sources.base import SourceError
from datagen.sources.groups import GROUP_MANIFEST_SCHEMA
from datagen.sources.identities import (
    DEMO_PEOPLE,
    IdentitiesSource,
    demo_identity_photos,
    identity_key,
    identity_manifest,
)
from datagen.stages.decode import DecodeStage
from datagen.stages.protocol import status_column
from datagen.stages.runner import run_stage


def _photos(identities: dict[str, int]) -> list[dict]:
    """Manifest rows: ``count`` photos per identity, every other one captioned."""
    return [
        {
            "uri": f"/photos/{name}/{j}.jpg",
            "identity": name,
            "caption": f"{name} photo {j}" if j % 2 == 0 else None,
        }
        for name, count in identities.items()
        for j in range(count)
    ]


def _write(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["uri", "identity", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    return str(path)


def _manifest(path: str, seed: int = 0, **params) -> list[dict]:
    return identity_manifest({"kind": "identities", "path": path, **params}, ".", seed).to_pylist()


PEOPLE = {"Ann Lee": 6, "bob": 5, "chen": 2, "dee": 4, "eve": 9}


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_manifest_formats_give_the_same_rows(tmp_path, suffix):
    rows = _photos(PEOPLE)
    got = _manifest(_write(tmp_path / f"m{suffix}", rows), samples_per_identity=3)
    reference = _manifest(_write(tmp_path / "ref.parquet", rows), samples_per_identity=3)
    strip = [{k: v for k, v in r.items() if k != "source"} for r in got]
    assert strip == [{k: v for k, v in r.items() if k != "source"} for r in reference]
    by_group: dict[str, list[dict]] = {}
    for row in got:
        by_group.setdefault(row["group"], []).append(row)
    assert list(by_group) == list(PEOPLE)  # manifest order
    for name, count in PEOPLE.items():
        samples = by_group[name]
        if count < 4:
            assert len(samples) == 1 and samples[0]["group_filter"]
            continue
        assert len(samples) == 3
        for k, row in enumerate(samples):
            assert row["key"] == f"{identity_key(name)}-s{k}"
            assert row["source"] == f"{tmp_path / f'm{suffix}'}#{name}"
            assert row["uri"] == [f"/photos/{name}/{f}.jpg" for f in row["frames"]]
            assert row["view_caption"] == [
                f"{name} photo {f}" if f % 2 == 0 else None for f in row["frames"]
            ]
            assert row["group_error"] is None and row["group_filter"] is None


def test_relative_uris_are_read_from_the_manifest_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    rows = [{"uri": f"img/{j}.jpg", "identity": "x"} for j in range(4)]
    rows.append({"uri": "s3://bucket/x/9.jpg", "identity": "x"})
    table = _manifest(_write(tmp_path / "sub" / "m.jsonl", rows), views=[5, 5], min_images=5)
    assert sorted(table[0]["uri"]) == sorted(
        [str(tmp_path / "sub" / "img" / f"{j}.jpg") for j in range(4)] + ["s3://bucket/x/9.jpg"]
    )


def test_too_few_images_is_one_filtered_row(tmp_path):
    path = _write(tmp_path / "m.csv", _photos({"chen": 2, "dee": 4}))
    rows = _manifest(path, samples_per_identity=2)
    few = [r for r in rows if r["group"] == "chen"]
    assert len(few) == 1
    assert few[0]["key"] == identity_key("chen")
    assert few[0]["group_filter"] == (
        "TooFewImages: identity chen has 2 images, fewer than min_images=4"
    )
    assert few[0]["views"] == 2 and few[0]["uri"] == ["/photos/chen/0.jpg", "/photos/chen/1.jpg"]
    # min_images=2: now chen is kept
    assert all(r["group_filter"] is None for r in _manifest(path, min_images=2))


def test_view_counts_in_bounds_without_repeats(tmp_path):
    counts = {f"id{i}": 2 + i % 9 for i in range(40)}
    path = _write(tmp_path / "m.parquet", _photos(counts))
    rows = _manifest(path, min_images=3, views=[3, 6], samples_per_identity=4)
    sizes = set()
    for row in rows:
        images = counts[row["group"]]
        if images < 3:
            assert row["group_filter"].startswith("TooFewImages")
            continue
        n = row["views"]
        assert 3 <= n <= min(6, images)
        assert len(set(row["frames"])) == n  # no photo twice in one sample
        assert all(0 <= f < images for f in row["frames"])
        assert len(set(row["uri"])) == n
        sizes.add(n)
    assert sizes == {3, 4, 5, 6}  # the whole range is drawn


def test_sampling_is_a_function_of_identity_and_seed(tmp_path):
    a = _write(tmp_path / "a.jsonl", _photos(PEOPLE))
    more = {"zed": 7, **PEOPLE, "yan": 8}  # other identities before and after
    b = _write(tmp_path / "b.jsonl", _photos(more))
    first, again = _manifest(a, seed=3), _manifest(a, seed=3)
    assert first == again
    picks = {r["key"]: (r["frames"], r["uri"]) for r in first}
    others = {r["key"]: (r["frames"], r["uri"]) for r in _manifest(b, seed=3)}
    assert all(others[k] == v for k, v in picks.items())
    reseeded = {r["key"]: r["frames"] for r in _manifest(a, seed=4, samples_per_identity=1)}
    assert any(reseeded[k] != picks[k][0] for k in reseeded if k in picks)


def test_keys_are_valid_unique_and_stable():
    names = ["Ann Lee", "ann_lee", "ann-lee!", "ü" * 300, "", "../../etc", "a.b.c"]
    keys = [identity_key(n) for n in names]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert KEY_PATTERN.match(f"{key}-s99")
    assert identity_key("Ann Lee") == identity_key("Ann Lee")
    assert identity_key("Ann Lee").startswith("Ann_Lee-")


def test_bad_rows_get_rows_of_their_own(tmp_path):
    lines = [
        {"uri": "/p/a0.jpg", "identity": "a"},
        {"uri": "", "identity": "a"},
        {"uri": "/p/x.jpg", "identity": None},
        {"uri": "/p/y.jpg", "identity": 42},
        {"uri": "/p/a0.jpg", "identity": "a"},  # the same photo again
        {"uri": "/p/a1.jpg", "identity": "a", "caption": ["not", "text"]},
        {"identity": "a"},
        *({"uri": f"/p/a{j}.jpg", "identity": "a"} for j in range(2, 6)),
    ]
    path = _write(tmp_path / "m.jsonl", lines)
    rows = _manifest(path, samples_per_identity=2)
    bad = {r["key"]: r for r in rows if r["group_error"]}
    assert sorted(bad) == [f"m-line{n}-bad" for n in (2, 3, 4, 5, 6, 7)]
    assert bad["m-line2-bad"]["group_error"] == (
        f"BadManifestRow: {path} line 2: uri '' is empty or not a string"
    )
    assert "identity None" in bad["m-line3-bad"]["group_error"]
    assert "identity 42" in bad["m-line4-bad"]["group_error"]
    assert "repeats line 1" in bad["m-line5-bad"]["group_error"]
    assert "caption ['not', 'text'] is not a string" in bad["m-line6-bad"]["group_error"]
    assert bad["m-line7-bad"]["uri"] == [""]
    kept = [r for r in rows if not r["group_error"]]
    assert len(kept) == 2 and {u for r in kept for u in r["uri"]} <= {
        f"/p/a{j}.jpg" for j in (0, 2, 3, 4, 5)
    }
    # csv: a row with more fields than the header is shifted, not guessed at
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("uri,identity\n/p/1.jpg,a\n/p/2.jpg,a,surplus\n,a\n")
    errors = [r["group_error"] for r in _manifest(str(csv_path), min_images=2) if r["group_error"]]
    assert errors == [
        f"BadManifestRow: {csv_path} line 3: 1 more fields than the header names",
        f"BadManifestRow: {csv_path} line 4: uri '' is empty or not a string",
    ]


def test_the_first_stage_reports_source_verdicts(tmp_path):
    """Filtered and error rows end at decode, named, without any photo being read."""
    path = _write(tmp_path / "m.jsonl", [*_photos({"chen": 2}), {"uri": "", "identity": "a"}])
    table = identity_manifest({"kind": "identities", "path": path}, ".", 0)
    out = run_stage(DecodeStage(), table.to_pydict(), name="decode", needs=())
    assert out[status_column("decode")] == ["filtered", "error"]
    assert out["decode.error"] == ["TooFewImages", "BadManifestRow"]
    assert out["decode.message"][0] == "identity chen has 2 images, fewer than min_images=4"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_bad_manifests_are_one_line_source_errors(tmp_path):
    cases: dict[str, tuple[Path, str]] = {}
    p = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"uri": ["a"], "person": ["x"]}), p)
    cases["missing column"] = (p, r"lacks columns \['identity'\]")
    p = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"uri": ["a"], "identity": [7]}), p)
    cases["wrong type"] = (p, r"column 'identity' has type int64, expected string")
    p = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"uri": ["a"], "identity": ["x"], "caption": [1.5]}), p)
    cases["wrong caption type"] = (p, r"column 'caption' has type double")
    p = tmp_path / "garbage.parquet"
    p.write_bytes(b"PAR1 not really")
    cases["unreadable"] = (p, r"not a readable parquet file")
    p = tmp_path / "bad.jsonl"
    p.write_text('{"uri": "a", "identity": "x"}\n{"uri": \n')
    cases["invalid json"] = (p, r"line 2: not valid JSON")
    p = tmp_path / "list.jsonl"
    p.write_text('["a", "x"]\n')
    cases["not an object"] = (p, r"line 1: a JSON object per line")
    p = tmp_path / "noid.jsonl"
    p.write_text('{"uri": "a"}\n')
    cases["jsonl missing column"] = (p, r"lacks columns \['identity'\]")
    p = tmp_path / "latin1.csv"
    p.write_bytes("uri,identity\né.jpg,x\n".encode("latin-1"))
    cases["not utf-8"] = (p, r"is not UTF-8 text")
    p = tmp_path / "header.csv"
    p.write_text("path,identity\na,x\n")
    cases["csv missing column"] = (p, r"lacks columns \['uri'\]")
    p = tmp_path / "absent.csv"
    cases["no such file"] = (p, r"does not exist")
    p = tmp_path / "folder.csv"
    p.mkdir()
    cases["a folder"] = (p, r"is a directory")
    for name, (path, message) in cases.items():
        with pytest.raises(SourceError, match=message) as exc:
            _manifest(str(path))
        assert str(path) in _one_line(exc), name


def test_a_fifo_manifest_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "m.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match="not a regular file"):
        _manifest(str(fifo))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"views": [1, 3]}, r"views: at least 2"),
        ({"views": [4, 3]}, r"views: need min <= max"),
        ({"min_images": 2, "views": [3, 4]}, r"min_images: must be >= views\[0\]=3"),
        ({"samples_per_identity": 0}, r"samples_per_identity: must be >= 1"),
        ({"path": "m.txt"}, r"path: an identity manifest ends in"),
        ({"colour": 1}, r"unknown key 'colour'"),
    ],
)
def test_bad_source_params_name_the_key(params, message):
    with pytest.raises(ParamError, match=message):
        identity_manifest({"kind": "identities", "path": "m.csv", **params}, ".")


def test_sources_resolve_dispatches_identities(tmp_path):
    path = _write(tmp_path / "m.csv", _photos({"dee": 4}))
    table = resolve({"kind": "identities", "path": path}, str(tmp_path), seed=1)
    assert table.schema == GROUP_MANIFEST_SCHEMA and table.num_rows == 1


# -- the demo identities ----------------------------------------------------------------------


def test_demo_identities_are_cached_and_stable(tmp_path):
    spec = {"kind": "demo_identities", "images_per_identity": 3, "min_images": 3, "max_side": 96}
    spec |= {"views": [2, 3], "cache_dir": str(tmp_path / "cache")}
    first = identity_manifest(spec, str(tmp_path / "work"), seed=0)
    files = sorted((tmp_path / "cache").rglob("*.jpg"))
    assert len(files) == 3 * len(DEMO_PEOPLE)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = identity_manifest(spec, str(tmp_path / "elsewhere"), seed=0)
    assert again.equals(first)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # read back, not rewritten
    assert not (tmp_path / "elsewhere").exists()

    rows = first.to_pylist()
    assert {r["group"] for r in rows} == set(DEMO_PEOPLE)
    assert len(rows) == 2 * len(DEMO_PEOPLE)  # samples_per_identity=2 (the default)
    for row in rows:
        assert row["group_filter"] is None and 2 <= row["views"] <= 3
        for uri, caption in zip(row["uri"], row["view_caption"], strict=True):
            assert Path(uri).is_file() and caption.startswith("a ")
            with Image.open(uri) as img:
                assert max(img.size) <= 96 and img.size[0] == img.size[1]
    # the crops of one person differ from each other
    astronaut = [np.asarray(Image.open(f)) for f in files if f.name.startswith("astronaut")]
    assert len(astronaut) == 3
    assert not np.array_equal(astronaut[0], astronaut[1])

    files[0].unlink()  # an incomplete cache is made again
    remade = identity_manifest(spec, str(tmp_path / "work"), seed=0)
    assert remade.equals(first) and files[0].exists()


def test_demo_cache_default_place_and_parameters(tmp_path):
    path = demo_identity_photos(str(tmp_path / "c"), 2, 80)
    assert Path(path).parent.name == "v1-2x80"
    table = pq.read_table(path)
    assert table.column_names == ["uri", "identity", "caption"]
    assert table.num_rows == 2 * len(DEMO_PEOPLE)
    spec = {"kind": "demo_identities", "images_per_identity": 2, "min_images": 2, "max_side": 80}
    identity_manifest(spec | {"views": [2, 2]}, str(tmp_path / "work"))
    assert (tmp_path / "work" / "demo_identities" / "v1-2x80" / "manifest.parquet").is_file()


def test_identities_source_params_are_typed():
    source = IdentitiesSource.Params("identities", "m.parquet")
    assert source.views == (2, 5) and source.min_images == 4
