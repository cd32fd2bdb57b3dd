"""The training DataModule: batch contract, mixing, determinism, resume, corrupt shards.

Fast tests use small synthetic shards written with ``datagen.shards.commit_shard``
(real JPEG/PNG bytes); one test reads shards made by the real demo DAG on Ray.
"""

from __future__ import annotations

import json
import math
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from datagen import shards
from datagen.schema import SchemaError, make_meta, palette_rgb
from tests.helpers import REPO, training_shards as S
from training.data import tasks as T
from training.data.config import DataConfig
from training.data.datamodule import OneGenDataModule
from training.data.index import batch_rng, build_subset_index, mix_weights, plan_window
from training.data.stream import SKIP_REASONS, OneGenStream
from training.data.buckets import nearest_bucket
from training.data.views import decode_view, load_view

BUCKETS = [[32, 32], [32, 48], [48, 32]]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth") / "out")
    S.write_subset(out, "t2i", [8, 8, 5])
    S.write_subset(out, "i2i", [8, 7, 8])
    S.write_subset(out, "semantic", [6])
    S.write_subset(out, "depth", [6])
    S.write_subset(out, "pose", [5])
    S.write_subset(out, "faceid", [9])
    return out


def cfg(out: str, **kw) -> dict:
    base = {
        "paths": {"t2i": out, "i2i": out},
        "batch_size": 4,
        "num_workers": 0,
        "seed": 7,
        "buckets": BUCKETS,
        "reads_per_batch": 2,
        "caption_dropout": 0.2,
    }
    base.update(kw)
    return base


def same_batch(a: dict, b: dict) -> bool:
    return (
        torch.equal(a["pixels"], b["pixels"])
        and torch.equal(a["cond_mask"], b["cond_mask"])
        and all(
            a[k] == b[k] for k in ("prompts", "tasks", "subsets", "keys", "skipped", "batch_index")
        )
    )


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("the stream ended")


# --- mixing ---------------------------------------------------------------------------------


def test_task_tables_derive_from_the_schema():
    """training.data.tasks restates nothing: its tables come from datagen.schema.TASKS and
    the subsets' families, and equal what they were when written by hand."""
    from training.data.layouts import LAYOUTS, layout_of

    assert T.FAMILIES == {
        "text2image": ("t2i",),
        "image2image": ("i2i", "semantic", "depth", "pose"),
        "multiview_id": ("multiview", "faceid"),
    }
    assert T.MAP_FIELDS == {
        "[[canny2image]]": ("canny.png", "canny"),
        "[[hed2img]]": ("hed.png", "hed"),
        "[[depth2image]]": ("depth.png", "depth"),
        "[[pose2image]]": ("pose.png", "pose"),
        "[[semanticmap2image]]": ("semantic.png", "semanticmap"),
        "[[boundingbox2image]]": ("boxes.png", "boundingbox"),
    }
    assert T.DEGRADATION_FIELDS == {
        "[[deblurring]]": "blur.jpg",
        "[[image_inpainting]]": "masked.jpg",
    }
    assert T.TAG_KINDS == {
        "[[semanticmap2image]]": "mask",
        "[[boundingbox2image]]": "boundingbox",
    }
    assert sorted(T.all_task_names()) == sorted(
        ["text2image", "faceid", "multiview", "camera_pose", "deblurring", "image_inpainting"]
        + ["canny2image", "image2canny", "hed2img", "image2hed", "depth2image", "image2depth"]
        + ["pose2image", "image2pose", "semanticmap2image", "image2semanticmap"]
        + ["boundingbox2image", "image2boundingbox"]
    )
    assert T.subset_task_names("i2i") == [
        "canny2image", "image2canny", "hed2img", "image2hed", "deblurring", "image_inpainting",
    ]  # fmt: skip
    assert T.subset_task_names("multiview") == ["multiview", "camera_pose"]
    assert T.task_spec("image2semanticmap").views == ("semantic.png", "jpg")
    assert T.task_token("camera_pose") == "[[multiview]]"
    # the loader's layout follows the subset's sample kind, with its image views per sample
    assert {s: (layout_of(s).kind, layout_of(s).num_views) for s in T.FAMILIES["image2image"]} == {
        s: ("pair", 2) for s in T.FAMILIES["image2image"]
    }
    assert (layout_of("t2i").num_views, layout_of("faceid").num_views) == (1, None)
    assert set(LAYOUTS) == {"single", "pair", "faceid", "multiview"}


def test_default_mix_is_equal_budget_per_family():
    assert mix_weights(["t2i", "i2i"]) == {"t2i": 0.5, "i2i": 0.5}
    w = mix_weights(["t2i", "i2i", "depth", "faceid"])
    assert w == pytest.approx({"t2i": 1 / 3, "i2i": 1 / 6, "depth": 1 / 6, "faceid": 1 / 3})
    assert mix_weights(["t2i", "i2i"], {"t2i": 3.0}) == {"t2i": 1.0, "i2i": 0.0}
    with pytest.raises(ValueError, match="no data configured"):
        mix_weights(["t2i"], {"depth": 1.0})


@pytest.mark.parametrize(
    "mix", [None, {"t2i": 3.0, "i2i": 1.0}, {"t2i": 1.0, "i2i": 1.0, "depth": 2.0, "faceid": 0.5}]
)
def test_mixing_proportions_match_weights(synth, mix):
    paths = {s: synth for s in (mix or {"t2i": 1, "i2i": 1})}
    dm = OneGenDataModule(cfg(synth, paths=paths, mix=mix))
    stream = dm.stream()
    n = 2000
    counts: dict[str, int] = {}
    for k in range(n):
        s = stream.plan_subset(k)
        counts[s] = counts.get(s, 0) + 1
    for subset, p in dm.probs.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts.get(subset, 0) - n * p) <= 4 * sigma, (subset, counts, dm.probs)
    # plan_subset is what make_batch uses
    assert all(stream.make_batch(k)["subsets"][0] == stream.plan_subset(k) for k in range(6))


def test_windows_cover_samples_uniformly(synth):
    index = build_subset_index([synth], "t2i")  # shards of 8, 8, 5
    rng = np.random.default_rng(0)
    hits = np.zeros(index.num_samples)
    draws = 6000
    for _ in range(draws):
        shard, first, stop = plan_window(rng, index, 4)
        assert index.shard_start[shard] <= first < stop <= index.shard_start[shard + 1]
        hits[first:stop] += 1
    expected = hits.mean()
    # each sample is covered by exactly `window` of the equally likely virtual starts
    assert np.all(np.abs(hits - expected) < 5 * math.sqrt(expected)), hits


# --- the batch contract ---------------------------------------------------------------------


def test_batches_follow_the_contract(synth):
    dm = OneGenDataModule(cfg(synth))
    stream = dm.stream()
    i2i_tasks = {
        "canny2image",
        "image2canny",
        "hed2img",
        "image2hed",
        "deblurring",
        "image_inpainting",
    }
    seen_tasks, buckets = set(), set()
    for k in range(24):
        b = stream.make_batch(k)
        B, V, C, H, W = b["pixels"].shape
        assert (B, C) == (4, 3) and [H, W] in BUCKETS and b["pixels"].dtype == torch.float32
        assert b["pixels"].min() >= -1 and b["pixels"].max() <= 1
        assert b["cond_mask"].dtype == torch.bool and b["cond_mask"].shape == (B, V)
        assert all(len(b[key]) == B for key in ("prompts", "tasks", "subsets", "keys"))
        assert len(set(b["keys"])) == B and b["skipped"] == 0 and b["batch_index"] == k
        subset = b["subsets"][0]
        assert set(b["subsets"]) == {subset} and all(key.startswith(subset) for key in b["keys"])
        if subset == "t2i":
            assert V == 1 and not b["cond_mask"].any()
            assert set(b["tasks"]) == {"text2image"}
        else:
            assert V == 2 and b["cond_mask"].tolist() == [[False, True]] * B
            assert set(b["tasks"]) <= i2i_tasks
        for task, prompt, key in zip(b["tasks"], b["prompts"], b["keys"], strict=True):
            token = T.task_token(task)
            assert prompt == token or prompt == f"{token} caption of {key}"  # caption dropout
        seen_tasks.update(b["tasks"])
        buckets.add((H, W))
    assert {"text2image", "image2canny", "canny2image", "deblurring"} <= seen_tasks
    assert len(buckets) >= 2


def test_views_are_aligned_and_reverse_swaps_them(synth):
    def first_i2i(**kw):
        stream = OneGenDataModule(cfg(synth, mix={"i2i": 1.0}, batch_size=2, **kw)).stream()
        return stream.make_batch(0)

    fwd = first_i2i(tasks=["canny2image"])
    rev = first_i2i(tasks=["image2canny"])
    assert set(fwd["tasks"]) == {"canny2image"} and set(rev["tasks"]) == {"image2canny"}
    assert fwd["keys"] == rev["keys"]  # the same draws, only the direction differs
    assert torch.equal(fwd["pixels"][:, 0], rev["pixels"][:, 1])
    assert torch.equal(fwd["pixels"][:, 1], rev["pixels"][:, 0])
    canny = fwd["pixels"][:, 1]
    assert torch.equal(canny[:, 0], canny[:, 1]) and torch.equal(
        canny[:, 0], canny[:, 2]
    )  # gray -> 3 ch


def test_other_subsets_decode_and_prompt(synth):
    paths = {s: synth for s in ("semantic", "depth", "pose", "faceid")}
    dm = OneGenDataModule(
        cfg(
            synth,
            paths=paths,
            mix={"semantic": 1, "depth": 1, "pose": 1, "faceid": 1},
            caption_dropout=0.0,
            reverse_prob=0.0,
        )
    )
    stream = dm.stream()
    got = set()
    for k in range(24):
        b = stream.make_batch(k)
        subset, px = b["subsets"][0], b["pixels"]
        got.add(subset)
        if subset == "faceid":
            V = px.shape[1]
            assert (
                2 <= V <= 4
                and b["cond_mask"].tolist() == [[False] + [True] * (V - 1)] * px.shape[0]
            )
            for prompt in b["prompts"]:
                assert prompt.startswith("[[faceid]] [[img0]] person ")
                assert f"[[img{V - 1}]]" in prompt and f"[[img{V}]]" not in prompt
        elif subset == "depth":
            assert set(b["tasks"]) == {"depth2image"}
            depth = px[:, 1]
            assert torch.all(depth[..., :2] == -1) and torch.all(
                depth[..., -2:] == 1
            )  # 16-bit, full range
        elif subset == "semantic":
            for task, prompt in zip(b["tasks"], b["prompts"], strict=True):
                kind = "mask" if task == "semanticmap2image" else "boundingbox"
                assert prompt.startswith(
                    f"[[{task}]] <#FF0000 red {kind}: cat> <#00FF00 lime {kind}: dog>"
                )
            sem = px[[i for i, t in enumerate(b["tasks"]) if t == "semanticmap2image"], 1]
            assert set(sem.unique().tolist()) <= {-1.0, 1.0}  # nearest resize keeps palette colours
        else:
            assert set(b["tasks"]) == {"pose2image"} and b["prompts"][0].startswith(
                "[[pose2image]] caption"
            )
    assert got == {"semantic", "depth", "pose", "faceid"}


def test_prompt_building_matches_the_release_format():
    fwd, rev = T.forward_task("[[depth2image]]"), T.reverse_task("[[depth2image]]")
    assert (fwd.name, fwd.views, fwd.cond_mask) == (
        "depth2image",
        ("jpg", "depth.png"),
        [False, True],
    )
    assert (rev.name, rev.views) == ("image2depth", ("depth.png", "jpg"))
    assert T.build_prompt(fwd, "a room") == "[[depth2image]] a room"
    assert T.build_prompt(rev, "a room") == "[[depth2image]] a room"
    assert (
        T.build_prompt(T.forward_task("[[text2image]]"), "a cat", drop_caption=True)
        == "[[text2image]]"
    )
    assert T.reverse_task("[[hed2img]]").name == "image2hed"
    meta = {
        "entities": [
            {"label": "mouse", "color": "yellow"},
            {"label": "moon", "color": "#00FFFF"},
            {"label": "sun"},
        ]
    }
    box = T.forward_task("[[boundingbox2image]]")
    assert T.build_prompt(box, "sky", meta) == (
        "[[boundingbox2image]] <#FFFF00 yellow boundingbox: mouse> "
        "<#00FFFF cyan boundingbox: moon> "
        "<#0000FF blue boundingbox: sun> sky"
    )
    sem = T.reverse_task("[[semanticmap2image]]")
    assert T.build_prompt(sem, "x", meta, drop_caption=True).endswith("<#0000FF blue mask: sun>")
    face = T.faceid_task(3)
    assert T.build_prompt(face, ["a", "b", "c"]) == "[[faceid]] [[img0]] a [[img1]] b [[img2]] c"
    assert (
        T.build_prompt(face, ["a", "b", "c"], drop_caption=True)
        == "[[faceid]] [[img0]] [[img1]] [[img2]]"
    )
    with pytest.raises(ValueError, match="palette"):
        T.colour_tags([{"label": "x", "color": "beige"}], "mask")
    pairs = T.candidate_tasks(
        "i2i",
        ["jpg", "canny.png", "blur.jpg", "json"],
        {"tasks": ["[[canny2image]]", "[[hed2img]]", "[[deblurring]]"]},
    )
    assert [(f.name, r.name if r else None) for f, r in pairs] == [
        ("canny2image", "image2canny"),
        ("deblurring", None),
    ]


def test_geometry_cover_and_center_crop():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # a white centre third
    view = decode_view(S.png(img), "x.png", (64, 64))
    assert view.shape == (3, 64, 64)
    assert (
        view.min() >= -1 and view.max() <= 1 and float(view.mean()) > 0.9
    )  # crop keeps the centre
    assert nearest_bucket(BUCKETS, 60, 40) == (32, 48) and nearest_bucket(BUCKETS, 40, 60) == (
        48,
        32,
    )
    big = S.image(256, 384, 1)  # JPEG decoded at a reduced DCT scale still fills the bucket
    assert decode_view(S.jpg(big), "jpg", (32, 48)).shape == (3, 32, 48)


def test_reduced_jpeg_and_full_png_views_share_one_geometry():
    """A JPEG decoded at 1/8 DCT scale and a full-size PNG map of the same frame
    land on the same pixels: the crop box is aligned to the reduction."""
    h, w = 256, 384
    img = np.zeros((h, w, 3), np.uint8)
    img[96:160, 200:264] = 255  # a white square off-centre
    size = (32, 48)  # cover scale 1/8: the JPEG is decoded reduced
    jpg = load_view(S.jpg(img), "jpg", size, (w, h))
    png = load_view(S.png(img[:, :, 0]), "canny.png", size, (w, h))

    def centroid(a: np.ndarray) -> np.ndarray:
        m = a.astype(np.float64) if a.ndim == 2 else a.astype(np.float64).mean(axis=2)
        ys, xs = np.mgrid[: m.shape[0], : m.shape[1]]
        return np.array([(ys * m).sum() / m.sum(), (xs * m).sum() / m.sum()])

    assert jpg.shape == (32, 48, 3) and png.shape == (32, 48)
    assert np.abs(centroid(jpg) - centroid(png)).max() < 0.1  # well under a pixel
    # pixel centres: source centre c lands on (c + 0.5) / 8 - 0.5 (square centre 127.5, 231.5)
    assert np.abs(centroid(png) - np.array([128 / 8 - 0.5, 232 / 8 - 0.5])).max() < 0.1
    # a frame that is wrong for the image (bad metadata): planned from the image itself
    assert load_view(S.jpg(img), "jpg", size, (1000, 1000)).shape == (32, 48, 3)


def test_buckets_off_the_patch_grid_are_refused(synth):
    with pytest.raises(ValueError, match="multiples of 16"):
        DataConfig.from_any(cfg(synth, buckets=[[30, 30]]))


# --- determinism and resume -----------------------------------------------------------------


def test_same_seed_and_rank_are_identical_ranks_differ(synth):
    a = take(OneGenDataModule(cfg(synth)).loader(), 6)
    b = take(OneGenDataModule(cfg(synth)).loader(), 6)
    assert all(same_batch(x, y) for x, y in zip(a, b, strict=True))
    r1 = take(OneGenDataModule(cfg(synth, rank=1)).loader(), 6)
    assert not any(x["keys"] == y["keys"] for x, y in zip(a, r1, strict=True))
    s2 = take(OneGenDataModule(cfg(synth, seed=8)).loader(), 6)
    assert not any(x["keys"] == y["keys"] for x, y in zip(a, s2, strict=True))


def test_two_workers_give_the_single_process_order(synth):
    single = take(OneGenDataModule(cfg(synth)).loader(), 8)
    multi = take(OneGenDataModule(cfg(synth, num_workers=2, prefetch_factor=2)).loader(), 8)
    assert [b["batch_index"] for b in multi] == list(range(8))
    assert all(same_batch(x, y) for x, y in zip(single, multi, strict=True))


def test_resume_yields_the_uninterrupted_batches(synth):
    full = take(OneGenDataModule(cfg(synth)).loader(), 10)
    resumed = take(OneGenDataModule(cfg(synth, num_workers=2), start_step=4).loader(), 6)
    assert all(same_batch(x, y) for x, y in zip(full[4:], resumed, strict=True))
    # gradient accumulation: step 3 of 2 batches/step starts at batch 6
    dm = OneGenDataModule(cfg(synth, batches_per_step=2), start_step=3)
    assert all(same_batch(x, y) for x, y in zip(full[6:], take(dm.loader(), 4), strict=True))
    # through the DataModule's checkpoint state
    state = dm.state_dict()
    assert state["step"] == 3 and state["seed"] == 7
    fresh = OneGenDataModule(cfg(synth, batches_per_step=2, seed=99))
    with pytest.warns(UserWarning, match="seed"):
        fresh.load_state_dict(state)
    assert fresh.start_batch() == 6 and fresh.cfg.seed == 7
    assert same_batch(take(fresh.loader(), 1)[0], full[6])


def test_lightning_resume_continues_the_stream(synth, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, tuple[str, ...]]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append((batch["batch_index"], tuple(batch["keys"])))
            return (self.w * batch["pixels"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps: int, ckpt: str | None = None) -> Recorder:
        model, run_dir = Recorder(), tmp_path / ("resumed" if ckpt else "first")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            accumulate_grad_batches=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ModelCheckpoint(dirpath=run_dir, every_n_train_steps=1, save_top_k=-1)],
        )
        trainer.fit(model, datamodule=OneGenDataModule(cfg(synth)), ckpt_path=ckpt)
        return model

    whole = fit(4).seen
    assert [k for k, _ in whole] == list(range(8))
    ckpt = next(p for p in (tmp_path / "first").glob("*.ckpt") if "step=2" in p.name)
    assert torch.load(ckpt, weights_only=False)["OneGenDataModule"]["step"] == 2
    resumed = fit(4, str(ckpt)).seen
    assert resumed == whole[4:]


# --- broken data ----------------------------------------------------------------------------


def _member(tar_path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(tar_path) as tar:
        return next(m for m in tar.getmembers() if m.name == name)


def test_corrupt_samples_are_skipped_and_counted(synth, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(Path(synth) / "t2i", out / "t2i")
    tars = sorted((out / "t2i").glob("*.tar"))
    index = {r["key"]: r for r in shards.read_indexes(str(out), "t2i").to_pylist()}
    broken: set[str] = set()

    def keys_of(tar: Path) -> list[str]:
        return [k for k, r in index.items() if f"{r['shard']}.tar" == tar.name]

    # 1. a truncated tar: every sample past the cut is unreadable
    data = tars[0].read_bytes()
    cut = len(data) // 2
    tars[0].write_bytes(data[:cut])
    broken |= {k for k in keys_of(tars[0]) if index[k]["offset"] + index[k]["length"] > cut}
    # 2. a garbled member header (checksum fails) and 3. a JPEG payload that is no image
    k1, k2, k3 = sorted(keys_of(tars[1]))[1:4]
    raw = bytearray(tars[1].read_bytes())
    hdr = _member(tars[1], f"{k1}.jpg").offset
    raw[hdr : hdr + 8] = b"XXXXXXXX"
    jpg = _member(tars[1], f"{k2}.jpg")
    raw[jpg.offset_data : jpg.offset_data + 16] = bytes(16)
    # 4. json metadata that does not parse (schema check)
    js = _member(tars[1], f"{k3}.json")
    raw[js.offset_data : js.offset_data + 1] = b"#"
    tars[1].write_bytes(bytes(raw))
    broken |= {k1, k2, k3}

    dm = OneGenDataModule(cfg(str(out), paths={"t2i": str(out)}, batch_size=4, reads_per_batch=1))
    skipped, keys, reasons = 0, set(), {}
    for k in range(40):
        b = dm.stream().make_batch(k)
        assert b["pixels"].shape[0] == 4 and len(b["keys"]) == 4  # still full
        assert sum(b["skip_reasons"].values()) == b["skipped"]
        assert bool(b["skip_last"]) == bool(b["skipped"])
        skipped += b["skipped"]
        keys.update(b["keys"])
        for reason, n in b["skip_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    assert not keys & broken
    assert skipped >= len(broken) // 2 and skipped > 0
    # each breakage has its stable reason: cut short, bad tar header, no image, bad metadata
    assert set(reasons) <= set(SKIP_REASONS) and reasons.get("truncated", 0) > 0, reasons
    assert {"unreadable", "decode", "schema"} <= set(reasons), reasons

    # all data broken: a clear error, not a hang
    for tar in tars:
        tar.write_bytes(b"\0" * 10)
    with pytest.raises(RuntimeError, match="shards look broken"):
        OneGenDataModule(
            cfg(str(out), paths={"t2i": str(out)}, max_skipped_per_batch=8)
        ).stream().make_batch(0)


def test_index_without_byte_ranges_falls_back_to_scanning(synth, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(Path(synth) / "i2i", out / "i2i")
    for idx in (out / "i2i").glob("*.parquet"):
        table = pq.read_table(idx)
        pq.write_table(table.drop_columns(["offset", "length"]), idx)
    scanned, indexed = build_subset_index([str(out)], "i2i"), build_subset_index([synth], "i2i")
    assert scanned.keys.equals(indexed.keys)
    assert np.array_equal(scanned.offsets, indexed.offsets) and np.array_equal(
        scanned.lengths, indexed.lengths
    )
    a = OneGenStream({"i2i": scanned}, {"i2i": 1.0}, DataConfig.from_any(cfg(synth))).make_batch(3)
    b = OneGenStream({"i2i": indexed}, {"i2i": 1.0}, DataConfig.from_any(cfg(synth))).make_batch(3)
    assert same_batch(a, b)


def test_damaged_index_falls_back_to_scanning_and_a_bad_manifest_is_named(synth, tmp_path):
    """The training reader checks manifests and indexes as verify does: a garbled index is
    a warning and a tar scan (same samples), a manifest naming a path outside its folder
    is a ShardFileError naming the manifest, before anything is read there."""
    out = tmp_path / "out"
    shutil.copytree(Path(synth) / "i2i", out / "i2i")
    for idx in (out / "i2i").glob("*.parquet"):
        idx.write_bytes(b"PAR1 not a parquet file")
    with pytest.warns(UserWarning, match="scanning the tar instead"):
        scanned = build_subset_index([str(out)], "i2i")
    assert scanned.keys.equals(build_subset_index([synth], "i2i").keys)
    manifest = out / "i2i" / shards.MANIFEST
    data = json.loads(manifest.read_text())
    data["shards"][0]["name"] = "../../escape.tar"
    manifest.write_text(json.dumps(data))
    with pytest.raises(shards.ShardFileError, match=str(manifest)):
        build_subset_index([str(out)], "i2i")


def test_reads_fsspec_urls(synth):
    import fsspec

    mem = fsspec.filesystem("memory")
    for path in sorted((Path(synth) / "t2i").iterdir()):
        mem.pipe(f"/onegen-test/out/t2i/{path.name}", path.read_bytes())
    url_cfg = cfg(synth, paths={"t2i": "memory://onegen-test/out"})
    local = OneGenDataModule(cfg(synth, paths={"t2i": synth})).stream()
    remote = OneGenDataModule(url_cfg).stream()
    assert remote.indexes["t2i"].urls[0].startswith("memory://onegen-test/out/t2i/")
    assert all(same_batch(local.make_batch(k), remote.make_batch(k)) for k in range(3))
    mem.rm("/onegen-test", recursive=True)


def test_task_filter_that_starves_a_subset_is_refused(synth):
    with pytest.raises(ValueError, match="nothing to train"):
        OneGenDataModule(cfg(synth, tasks=["canny2image"])).setup()  # t2i has no canny task


@pytest.mark.parametrize("bug", [KeyError, TypeError])
def test_a_bug_propagates_while_a_sample_missing_a_field_is_skipped(synth, monkeypatch, bug):
    """Only data problems of a sample are skips: a sample that lacks a field is skipped
    (reason ``schema``) with or without ``validate``; a KeyError / TypeError raised by our own
    code (here a layout builder) propagates with its traceback, never counted as a skip."""
    from training.data import layouts
    from training.data import stream as stream_module

    def number(key: str) -> int:
        return int(key.rsplit("_", 1)[1])

    real = stream_module.sample_files

    def lossy(data, key):
        files = real(data, key)
        if number(key) % 3 == 0:  # every third sample lacks its metadata or its image
            del files["json" if number(key) % 2 else "jpg"]
        return files

    monkeypatch.setattr(stream_module, "sample_files", lossy)
    for validate in (True, False):
        stream = OneGenDataModule(cfg(synth, paths={"t2i": synth}, validate=validate)).stream()
        batches = [stream.make_batch(k) for k in range(6)]
        reasons: dict[str, int] = {}
        for b in batches:
            assert len(b["keys"]) == 4 and all(number(key) % 3 for key in b["keys"])
            for reason, n in b["skip_reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + n
        assert set(reasons) == {"schema"} and reasons["schema"] > 0, (validate, reasons)
        assert layouts.SampleFiles({"jpg": b"x"}).get("json") is None
        with pytest.raises(SchemaError, match="missing field 'json'"):
            layouts.SampleFiles({"jpg": b"x"})["json"]

    def broken_builder(*args, **kwargs):
        raise bug("a bug in the layout builder")

    single = layouts.LAYOUTS["single"]
    monkeypatch.setitem(layouts.LAYOUTS, "single", replace(single, build=broken_builder))
    with pytest.raises(bug, match="a bug in the layout builder"):
        OneGenDataModule(cfg(synth, paths={"t2i": synth})).stream().make_batch(0)


def test_batch_rng_is_distinct_per_rank_and_step():
    draws = {(r, k): batch_rng(0, r, k).random() for r in range(3) for k in range(50)}
    assert len(set(draws.values())) == len(draws)
    assert batch_rng(0, 1, 5).random() == batch_rng(0, 1, 5).random()
    assert (
        T.task_token("image2canny") == "[[canny2image]]"
        and T.task_token("hed2img") == "[[hed2img]]"
    )


# --- shards from the real demo DAG (Ray) ----------------------------------------------------


@pytest.fixture(scope="module")
def demo_out(ray_local, tmp_path_factory) -> str:
    from orchestration.datagen_job import run
    from pipelines import dag

    tmp = tmp_path_factory.mktemp("demo")
    config = dag.load(
        REPO / "pipelines" / "captioned.yaml",
        [
            f"output={tmp / 'out'}",
            "source.n=12",
            f"source.cache_dir={tmp / 'inputs'}",
            "source.max_side=256",
            "shards.max_samples=4",
            "subsets=[t2i,i2i]",
            f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        ],
    )
    return run(config, log=lambda *_: None).output


@pytest.mark.slow
def test_reads_the_demo_dag_output_end_to_end(demo_out):
    dm = OneGenDataModule(
        {
            "paths": demo_out,
            "batch_size": 4,
            "num_workers": 2,
            "seed": 0,
            "buckets": [[64, 64], [64, 96], [96, 64]],
            "reads_per_batch": 2,
        }
    )
    dm.setup()
    assert sorted(dm.probs) == ["i2i", "t2i"]
    assert {s: i.num_samples for s, i in dm.indexes.items()} == {"t2i": 12, "i2i": 12}
    demo_keys = {f"demo_{i:06d}" for i in range(12)}
    subsets = set()
    for b in take(dm.train_dataloader(), 10):
        V = 1 if b["subsets"][0] == "t2i" else 2
        assert b["pixels"].shape[:2] == (4, V) and b["skipped"] == 0
        assert set(b["keys"]) <= demo_keys and b["pixels"].abs().max() <= 1
        assert all(p.startswith("[[") for p in b["prompts"])
        subsets.add(b["subsets"][0])
    assert subsets == {"t2i", "i2i"}
