"""decode and degrade outputs (``pipelines/captioned.yaml``, the demo DAG's decode and
degrade stages before it gained a caption stage) are byte-identical to what the code before the Stage
protocol wrote (tests/data/golden_demo_shards.json: sha256 of every file of the demo DAG's
t2i and i2i samples, made at commit 66240e2; the json with its machine-dependent source
path reduced to the file name; five entries remade on 2026-12-05, when the motion blur moved
off OpenCV's CPU-dependent filter2D and this machine's AVX-512 OpenCV gave another soft-edge
map for one image; the twelve soft-edge maps remade on 2026-12-07, when they moved off
OpenCV's float filters, which gave CI's CPU another map than this machine's, to float64
numpy). The demo inputs come from installed packages and Pillow's JPEG encoder: an upgrade
of those can change them, and then this test says so."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from datagen import sources
from pipelines import builder, dag
from tests.helpers import REPO

GOLDEN = REPO / "tests" / "data" / "golden_demo_shards.json"


def _digests(out: Path) -> dict[str, str]:
    found = {}
    for subset in ("t2i", "i2i"):
        for tar in sorted((out / subset).glob("*.tar")):
            with tarfile.open(tar) as tf:
                for member in tf.getmembers():
                    data = tf.extractfile(member).read()
                    if member.name.endswith(".json"):
                        meta = json.loads(data)
                        meta["source"] = Path(meta["source"]).name
                        data = json.dumps(meta, sort_keys=True).encode()
                    found[f"{subset}/{tar.name}/{member.name}"] = hashlib.sha256(data).hexdigest()
    return found


def test_decode_and_degrade_outputs_are_byte_identical_to_before(tmp_path):
    cfg = dag.load(
        REPO / "pipelines" / "captioned.yaml",
        [
            f"output={tmp_path / 'out'}",
            "source.n=12",
            f"source.cache_dir={tmp_path / 'inputs'}",
            "source.max_side=256",
            "shards.max_samples=4",
            "subsets=[t2i,i2i]",
        ],
    )
    manifest = sources.resolve(cfg.source_spec, work_dir=str(tmp_path / "inputs"))
    rows = builder.input_rows(manifest, [["t2i", "i2i"]] * manifest.num_rows, ["t2i", "i2i"])
    builder.run_in_process(cfg, rows, str(tmp_path / "out"))
    assert _digests(tmp_path / "out") == json.loads(GOLDEN.read_text())
