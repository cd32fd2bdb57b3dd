"""``onegen eval`` end to end with a real checkpoint (a tiny fit on shards written as datagen
writes them): NYUv2 and DIODE as tiny folders in Marigold's published layouts, the
``onegen`` held-out benchmark; outputs, resuming per sample, ``--devices 2`` matching one
process, and every bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO
from tests.helpers.eval_cli import eval_cli as _eval

NYU = [("kitchen_0004", "0001"), ("office_0006", "0120")]
DIODE_FILES = [
    "indoors/scene_00021/scan_00189/00021_00189_indoors_200_010",
    "outdoor/scene_00022/scan_00196/00022_00196_outdoor_350_020",
]


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y + seed * 50) % 256], -1)
    return base.astype(np.uint8)


@pytest.fixture(scope="module")
def nyu(tmp_path_factory) -> Path:
    """Marigold's nyu_labeled_extracted: test/<scene>/rgb_XXXX.png, depth_XXXX.png (uint16 mm),
    filled_XXXX.png, and data_split's filename_list_test.txt."""
    root = tmp_path_factory.mktemp("nyu")
    lines = []
    for i, (scene, n) in enumerate(NYU):
        folder = root / "test" / scene
        folder.mkdir(parents=True)
        Image.fromarray(_rgb(480, 640, i)).save(folder / f"rgb_{n}.png")
        y = np.mgrid[0:480, 0:640][0]
        depth = (1000 + 8 * y + 500 * i).astype(np.uint16)  # 1 .. 5.3 m
        Image.fromarray(depth).save(folder / f"depth_{n}.png")
        Image.fromarray(depth).save(folder / f"filled_{n}.png")
        lines.append(
            f"test/{scene}/rgb_{n}.png test/{scene}/depth_{n}.png test/{scene}/filled_{n}.png"
        )
    (root / "filename_list_test.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def diode(tmp_path_factory) -> Path:
    """DIODE's val/: <name>.png (768 x 1024), <name>_depth.npy ([768, 1024, 1] float32 m),
    <name>_depth_mask.npy ([768, 1024]), and diode_val_all_filename_list.txt."""
    root = tmp_path_factory.mktemp("diode")
    lines = []
    for i, name in enumerate(DIODE_FILES):
        (root / name).parent.mkdir(parents=True)
        Image.fromarray(_rgb(768, 1024, i)).save(root / f"{name}.png")
        y = np.mgrid[0:768, 0:1024][0]
        np.save(root / f"{name}_depth.npy", (2.0 + y / 50.0 + 10 * i)[..., None].astype(np.float32))
        mask = np.ones((768, 1024), np.float32)
        mask[:50] = 0
        np.save(root / f"{name}_depth_mask.npy", mask)
        lines.append(f"{name}.png {name}_depth.npy {name}_depth_mask.npy")
    (root / "diode_val_all_filename_list.txt").write_text("\n".join(lines) + "\n")
    return root


def _depth_args(run: dict, bench: str, path: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", run["run"], "--benchmark", bench, "--path", str(path),
            "--out", str(out), "--steps", "2", "--size", "64", "--device", "cpu", *extra]  # fmt: skip


def test_nyuv2_end_to_end_and_resume(run, nyu, tmp_path, capsys):
    out = tmp_path / "nyu"
    code, stdout, err = _eval(capsys, *_depth_args(run, "nyuv2", nyu, out))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    depth = metrics["tasks"]["image2depth"]
    assert depth["n"] == 2 and 0 <= depth["delta1"] <= 1 and depth["abs_rel"] > 0
    assert metrics["paper"] == {"abs_rel": 0.068, "delta1": 0.952} and metrics["done"] == 2
    report = (out / "report.md").read_text()
    assert "| image2depth | abs_rel |" in report and "| 0.068 |" in report and "Table 4" in report
    assert (out / "grid.png").is_file() and "image2depth (n=2)" in stdout
    # resume: only the missing sample runs again, and comes out the same (seeded per sample)
    files = sorted((out / "samples").glob("*.json"))
    assert len(files) == 2
    kept, removed = files
    stamp, before = kept.stat().st_mtime_ns, json.loads(removed.read_text())
    removed.unlink()
    code, _, err = _eval(capsys, *_depth_args(run, "nyuv2", nyu, out))
    assert code == 0, err
    assert kept.stat().st_mtime_ns == stamp and json.loads(removed.read_text()) == before
    assert json.loads((out / "metrics.json").read_text())["tasks"] == metrics["tasks"]


@pytest.mark.slow
def test_two_processes_split_the_samples_and_agree_with_one(run, diode, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = _eval(capsys, *_depth_args(run, "diode", diode, one))
    assert code == 0, err
    code, _, err = _eval(capsys, *_depth_args(run, "diode", diode, two, "--devices", "2"))
    assert code == 0, err
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert a["tasks"]["image2depth"]["n"] == 2 and a["paper"]["abs_rel"] == 0.294
    assert b["tasks"] == a["tasks"]


def test_the_onegen_benchmark_scores_held_out_samples_of_every_task(run, tmp_path, capsys):
    from tests.helpers.tiny_clip import save_tiny_clip
    from tests.helpers.tiny_face import save_face_folder
    from tests.helpers.tiny_lpips import save_lpips_folder
    from training.data.holdout import holdout_point

    clip = save_tiny_clip(tmp_path / "clip")
    save_lpips_folder(tmp_path / "lpips", "alex")
    face = save_face_folder(tmp_path / "face")
    out = tmp_path / "onegen"
    code, _, err = _eval(capsys, "--checkpoint", run["run"], "--benchmark", "onegen", "--path",
                         run["shards"], "--out", str(out), "--num", "1", "--steps", "2",
                         "--size", "32", "--device", "cpu", "--clip", str(clip),
                         "--lpips", str(tmp_path / "lpips"), "--face", str(face))  # fmt: skip
    assert code == 0, err
    tasks = json.loads((out / "metrics.json").read_text())["tasks"]
    assert {"image2depth", "canny2image", "multiview", "camera_pose"} <= set(tasks)
    assert "clip_score" in tasks["text2image"] and "lpips" in tasks["canny2image"]
    assert "id_sim" in tasks["faceid"]
    for path in (out / "samples").glob("*.json"):  # never a sample the fit trained on
        task, subset, key = json.loads(path.read_text())["id"].split("/", 2)
        assert holdout_point(subset, key) < 0.4, (task, key)


def test_bad_benchmark_folders_are_one_line(run, nyu, diode, tmp_path, capsys):
    import shutil

    def fails(bench: str, path: Path, expect: str, *extra: str) -> None:
        code, _, err = _eval(capsys, *_depth_args(run, bench, path, tmp_path / "o", *extra))
        lines = err.strip().splitlines()
        assert code == 2 and expect in lines[-1], lines
        assert not (tmp_path / "o" / "metrics.json").exists()

    fails("nyuv2", tmp_path, "missing split file; nyuv2 expects filename_list_test.txt")
    bad = Path(shutil.copytree(nyu, tmp_path / "nyu8"))
    first = bad / "test" / NYU[0][0] / f"depth_{NYU[0][1]}.png"
    Image.fromarray(np.zeros((480, 640), np.uint8)).save(first)  # 8-bit: not millimetres
    fails("nyuv2", bad, "expected 16-bit millimetres")
    Image.fromarray(np.zeros((240, 320), np.uint16)).save(first)
    fails("nyuv2", bad, "depth of shape (240, 320), expected (480, 640)")
    (bad / "test" / NYU[1][0] / f"rgb_{NYU[1][1]}.png").unlink()
    fails("nyuv2", bad, "listed in filename_list_test.txt:2 but missing")
    dbad = Path(shutil.copytree(diode, tmp_path / "diode"))
    np.save(dbad / f"{DIODE_FILES[0]}_depth.npy", np.zeros((10, 10), np.float32))
    fails("diode", dbad, "depth of shape (10, 10), expected (768, 1024)")
    fails("nyuv2", nyu, "--size 60: not a multiple of 16", "--size", "60")
    fails("nyuv2", nyu, "--lpips is for --benchmark gso-nvs / onegen", "--lpips", str(tmp_path))


def test_a_checkpoint_without_the_task_is_one_line(nyu, tmp_path, capsys):
    from training.config import load_config
    from training.fit import fit

    result = fit(load_config(REPO / "training/configs/demo.yaml", [
        "data.kind=synthetic", "data.synthetic.tasks=[text2image]", "data.synthetic.resolution=32",
        "trainer.max_steps=1", "checkpoint.every_n_steps=1", "samples.every_n_steps=0",
        "eval.every_n_steps=0", f"runs_dir={tmp_path}/runs", "mlflow.enabled=false",
    ]))  # fmt: skip
    code, _, err = _eval(
        capsys, *_depth_args({"run": result.run_dir}, "nyuv2", nyu, tmp_path / "o")
    )
    assert code == 2 and "--task image2depth was never trained" in err.strip().splitlines()[-1], err
