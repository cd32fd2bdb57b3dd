"""The plain-torch LPIPS against the ``lpips`` package, both from the same weights saved in
the published files: the package's own v0.1 linear layers and a random backbone (``pnet_rand``:
nothing downloaded) written as torchvision's checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.tiny_lpips import save_lpips_folder
from training.config import ConfigError
from training.evaluation.lpips import load_lpips
from training.evaluation.scorer_folders import LPIPS_FILES


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_matches_the_package(tmp_path, net):
    reference = save_lpips_folder(tmp_path / net, net)
    ours = load_lpips(tmp_path / net)
    assert ours.net == net
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (3, 3, 64, 64)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    x, y = torch.from_numpy(a), torch.from_numpy(b)
    expect = reference(x, y).flatten().detach().numpy()
    got = ours(x, y).numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-7)
    assert ours(x, x).abs().max() < 1e-6 and (got > 0).all()
    # one pair of [0, 1] HWC images, as the NVS scorer calls it
    pair = ours.distance((a[0].transpose(1, 2, 0) + 1) / 2, (b[0].transpose(1, 2, 0) + 1) / 2)
    assert pair == pytest.approx(float(expect[0]), rel=1e-5)


def test_bad_lpips_folders_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="expected vgg.pth"):
        load_lpips(tmp_path)
    save_lpips_folder(tmp_path / "v", "vgg")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "v" / "vgg.pth")
    with pytest.raises(ConfigError, match="no lin1.model.1.weight"):
        load_lpips(tmp_path / "v")
    (tmp_path / "v" / LPIPS_FILES["vgg"][1]).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a PyTorch state dict"):
        load_lpips(tmp_path / "v")
