"""Sample grids a reviewer can read (labelled panels, a header per row, logged per step with
``MlflowClient.log_image``) and the progress line's ETA.

The fit tests run one real single-process Lightning fit on CPU (synthetic data, tiny model)
tracked in a real sqlite MLflow store; the renderer and the progress line are also tested
on their own.
"""

from __future__ import annotations

import contextlib
import io
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.inference.grid import Layout, Row, conditional_row, render_grid, text2image_rows

CELL = 64  # 2x the 32 px samples: each sample pixel is a 2x2 block in the grid
PROMPTS = ["a photo of a cat", "a red bicycle leaning on a white wall in the evening light"]


def _dark(region: np.ndarray, below: int = 110) -> int:
    """Pixels of ``region`` (HxWx3 uint8) that are text-dark in every channel."""
    return int((region < below).all(axis=-1).sum())


def _crop(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return img[top:bottom, left:right]


def _caption_box(lay: Layout, i: int, j: int) -> tuple[int, int, int, int]:
    left, top, right, _ = lay.panel_box(i, j)
    return left, top - lay.caption_height, right, top


# --------------------------------------------------------------------------- the renderer


def _views(seed: int, v: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(v, 3, size, size, generator=g) * 2 - 1


def test_renderer_lays_out_labelled_panels_at_the_cell_size():
    pixels, generated = _views(0), _views(1)
    row = conditional_row(
        "canny2image",
        "[[canny2image]] " + PROMPTS[1],
        pixels,
        torch.tensor([False, True]),
        generated,
    )
    assert [p.caption for p in row.panels] == ["condition", "generated", "target"]
    assert row.prompt == PROMPTS[1]  # the task token is in the header already
    assert torch.equal(row.panels[0].pixels, pixels[1]) and torch.equal(
        row.panels[2].pixels, pixels[0]
    )
    assert torch.equal(row.panels[1].pixels, generated[0])

    lay = Layout(CELL)
    img = render_grid([row], CELL, step=7)
    assert img.mode == "RGB" and img.size == lay.size(1, 3)
    w, h = img.size
    assert w >= 3 * CELL and h >= CELL + lay.header_height
    arr = np.asarray(img)
    for j, panel in enumerate(row.panels):
        # Nearest-neighbour: each 32 px sample pixel is an exact 2x2 block filling the cell.
        expected = ((panel.pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        expected = expected.permute(1, 2, 0).numpy().repeat(2, axis=0).repeat(2, axis=1)
        np.testing.assert_array_equal(_crop(arr, lay.panel_box(0, j)), expected)
        assert _dark(_crop(arr, _caption_box(lay, 0, j))) > 5, f"caption {j} not drawn"
    header = _crop(arr, lay.header_box(0, 3))
    assert _dark(header) > 50, "no text in the header band"
    # The header names the task and the prompt: an empty prompt draws less in the band.
    bare = np.asarray(render_grid([Row("canny2image", "", row.panels)], CELL, step=7))
    assert _dark(header) > _dark(_crop(bare, lay.header_box(0, 3))) + 20


def test_renderer_text2image_one_row_per_prompt_and_large_images_reduced():
    images = [_views(2, 1)[0], _views(3, 1, size=200)[0]]  # one reduced, one enlarged
    rows = text2image_rows(PROMPTS, images)
    assert [r.prompt for r in rows] == PROMPTS
    assert all([p.caption for p in r.panels] == ["generated"] for r in rows)
    lay = Layout(CELL)
    img = render_grid(rows, CELL)
    assert img.size == lay.size(2, 1)
    arr = np.asarray(img)
    for i in range(2):
        assert _dark(_crop(arr, lay.header_box(i, 1))) > 50
        panel = _crop(arr, lay.panel_box(i, 0)).astype(np.int16)
        assert panel.std() > 10  # the image fills the cell, not the empty box
    # A very long prompt is cut to the band, never drawn over the panels.
    long = text2image_rows(["word " * 300], images[:1])
    arr = np.asarray(render_grid(long, CELL))
    assert np.asarray(render_grid(long, CELL)).shape == arr.shape
    assert arr.shape[:2] == lay.size(1, 1)[::-1]
    left, top, right, _ = lay.header_box(0, 1)
    gap = arr[lay.header_box(0, 1)[3] : lay.panel_box(0, 0)[1] - lay.caption_height, left:right]
    assert _dark(gap) == 0


def test_renderer_keeps_aspect_of_non_square_panels():
    wide = torch.zeros(3, 16, 32)  # gray, 2:1
    img = np.asarray(render_grid(text2image_rows(["x"], [wide]), CELL))
    lay = Layout(CELL)
    cell = _crop(img, lay.panel_box(0, 0))
    gray = (cell == 128).all(axis=-1)
    rows = np.flatnonzero(gray.any(axis=1))
    assert gray.any(axis=0).all() and len(rows) == CELL // 2  # full width, half the height


# --------------------------------------------------------------------------- the progress line


def test_progress_line_has_an_eta_from_the_recent_step_time(monkeypatch):
    import training.module as module_mod
    from common.durations import format_eta
    from training.config import load_config
    from training.module import OneGenModule

    assert [format_eta(s) for s in (0, 42.4, 83, 3600 + 5 * 60 + 9, 2 * 86400 + 4 * 3600)] == [
        "0s",
        "42s",
        "1m23s",
        "1h05m",
        "2d04h",
    ]
    clock = [1000.0]
    monkeypatch.setattr(module_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    m = OneGenModule(load_config(None, ["trainer.max_steps=100"]))
    assert "ETA --" in m.progress_line(10, {"train/loss": 0.5})  # nothing measured yet
    m.last_perf = {"perf/samples_per_s": 4.0, "perf/step_time_s": 0.5}
    clock[0] += 5.0
    line = m.progress_line(20, {"train/loss": 0.5})
    assert line.startswith("step 20/100 | loss 0.5000 | 4.0 samples/s | ETA "), line
    # measured between the lines: 5 s / 10 steps, 80 steps left
    assert "ETA 40s" in line, line
    clock[0] += 60.0  # a slow window (3 s/step) moves the ETA: 60 steps left -> 3m00s
    assert "ETA 3m00s" in m.progress_line(40, {})
    clock[0] += 1.0
    assert "ETA 0s" in m.progress_line(100, {})
    m2 = OneGenModule(load_config(None, ["trainer.max_steps=100"]))
    m2.last_perf = {"perf/step_time_s": 2.0}  # the first line of a fit: the monitor's time
    assert "ETA 3m00s" in m2.progress_line(10, {})


# --------------------------------------------------------------------------- a real fit


@pytest.fixture(scope="module")
def grid_fit(tmp_path_factory):
    from training.config import load_config
    from training.fit import fit

    tmp = tmp_path_factory.mktemp("grids")
    prompts = "[" + ",".join(f'"{p}"' for p in PROMPTS) + "]"
    cfg = load_config(None, [
        "data.kind=synthetic", "data.batch_size=2", "data.synthetic.resolution=32",
        "data.synthetic.tasks=[canny2image]", "trainer.max_steps=4",
        "trainer.log_every_n_steps=2", "samples.every_n_steps=2",
        "samples.tasks=[text2image,canny2image]", f"samples.prompts={prompts}",
        "samples.resolution=32", "samples.steps=2", f"samples.cell={CELL}",
        f"runs_dir={tmp}/runs", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        "mlflow.system_metrics=false", "encoders.text_max_length=24",
    ])  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fit(cfg)
    assert result.global_step == 4
    return {"result": result, "db": f"sqlite:///{tmp}/mlflow.db", "stdout": out.getvalue()}


EXPECTED = {"text2image": (len(PROMPTS), 1), "canny2image": (1, 3)}  # task: (rows, panels)


def test_fit_logs_one_image_per_task_and_step_to_mlflow(grid_fit, tmp_path):
    from mlflow.tracking import MlflowClient

    run_id = grid_fit["result"].run_id
    client = MlflowClient(grid_fit["db"])
    names = [Path(f.path).name for f in client.list_artifacts(run_id, "images")]
    logged: dict[tuple[str, int], str] = {}
    for name in names:
        m = re.fullmatch(r"samples~(\w+)\+step\+(\d+)\+timestamp\+\d+\+[-0-9a-f]+\.png", name)
        if m:
            assert (m[1], int(m[2])) not in logged, names
            logged[(m[1], int(m[2]))] = name
    assert sorted(logged) == sorted((t, s) for t in EXPECTED for s in (2, 4)), names
    assert client.get_run(run_id).data.tags.get("mlflow.loggedImages") == "True"
    top = {f.path for f in client.list_artifacts(run_id)}
    assert "samples" not in top, top  # logged once, as images, not also as a folder
    # The logged image is the grid written to the run folder.
    got = client.download_artifacts(run_id, f"images/{logged[('canny2image', 4)]}", str(tmp_path))
    disk = Path(grid_fit["result"].run_dir) / "samples" / "step_00000004" / "canny2image.png"
    np.testing.assert_array_equal(np.asarray(Image.open(got)), np.asarray(Image.open(disk)))


def test_fit_writes_readable_grids_to_the_run_folder(grid_fit):
    lay = Layout(CELL)
    folder = Path(grid_fit["result"].run_dir) / "samples"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002", "step_00000004"]
    for step in ("step_00000002", "step_00000004"):
        for task, (n_rows, n_cols) in EXPECTED.items():
            img = Image.open(folder / step / f"{task}.png")
            assert img.size == lay.size(n_rows, n_cols), (task, img.size)
            assert img.height >= n_rows * CELL and img.width >= n_cols * CELL
            arr = np.asarray(img.convert("RGB"))
            for i in range(n_rows):
                assert _dark(_crop(arr, lay.header_box(i, n_cols))) > 50, (task, i)
                for j in range(n_cols):
                    assert _dark(_crop(arr, _caption_box(lay, i, j))) > 5, (task, i, j)
                    panel = _crop(arr, lay.panel_box(i, j))
                    # 32 px samples shown nearest-neighbour at 64 px: 2x2 blocks
                    np.testing.assert_array_equal(panel[0::2, 0::2], panel[1::2, 1::2])


def test_fit_progress_line_shows_eta(grid_fit):
    lines = [ln for ln in grid_fit["stdout"].splitlines() if ln.startswith("step ")]
    assert [ln.split(" |")[0] for ln in lines] == ["step 2/4", "step 4/4"], grid_fit["stdout"]
    assert re.search(r"\| ETA (\d+s|\d+m\d\ds|\d+h\d\dm) ", lines[0] + " "), lines[0]
    assert "samples/s" in lines[0] and "loss " in lines[0], lines[0]
    assert "| ETA 0s" in lines[1], lines[1]
